#pragma once
/* Scope-bound cleanup helpers (GNU C __attribute__((cleanup))). A local declared with one of
 * these is released when it leaves scope; ownership leaves a scope only through TAKE_PTR/TAKE_FD. */

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static inline void
util_freep(void *p)
{
    free(*(void **)p);
}

static inline void
util_closep(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}

static inline void
util_fclosep(FILE **f)
{
    if (*f)
        fclose(*f);
}

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _cleanup_free_ _cleanup_(util_freep)
#define _cleanup_close_ _cleanup_(util_closep)
#define _cleanup_fclose_ _cleanup_(util_fclosep)

/* Return the value of a pointer variable and set the variable to NULL (hand ownership out). */
#define TAKE_PTR(p)                    \
    ({                                 \
        typeof(p) take_ptr_tmp_ = (p); \
        (p) = NULL;                    \
        take_ptr_tmp_;                 \
    })

/* Same for file descriptors: returns the fd and leaves -1 behind. */
#define TAKE_FD(fd)                  \
    ({                               \
        int take_fd_tmp_ = (fd);     \
        (fd) = -1;                   \
        take_fd_tmp_;                \
    })

#define ELEMENTSOF(a) (sizeof(a) / sizeof((a)[0]))
