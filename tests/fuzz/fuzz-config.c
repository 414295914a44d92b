/* libFuzzer target: nova.conf text through the config reader (libinih, the option table,
 * $-references, long lines) and the dump of whatever loads. */

#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "err.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct agent_config *cfg = NULL;
    struct agent_err err = {0};
    char *text = malloc(size + 1);

    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    if (config_load_string("fuzz.conf", text, &cfg, &err) == 0) {
        int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            config_dump(cfg, fd);
            close(fd);
        }
        config_free(cfg);
    }
    free(text);
    return 0;
}
