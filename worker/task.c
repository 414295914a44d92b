/* The snapshot task-state table, as nova-compute's _snapshot_instance walks it:
 *
 *   image_snapshot_pending --BEGIN--> image_snapshot          (expected: pending)
 *   image_snapshot --VIEW_READY--> image_pending_upload       (expected: image_snapshot)
 *   image_pending_upload --UPLOAD_BEGIN--> image_uploading    (expected: pending_upload)
 *   image_uploading --DONE--> None                            (expected: uploading)
 *   any snapshot state --FAIL--> None                          (reverts_task_state)
 *
 * Every other pair is illegal. */

#include "task.h"

#include <errno.h>
#include <string.h>

static const char *const state_names[TASK_STATE_MAX] = {
    [TASK_NONE] = NULL,
    [TASK_IMAGE_SNAPSHOT_PENDING] = "image_snapshot_pending",
    [TASK_IMAGE_SNAPSHOT] = "image_snapshot",
    [TASK_IMAGE_PENDING_UPLOAD] = "image_pending_upload",
    [TASK_IMAGE_UPLOADING] = "image_uploading",
};

static const char *const event_names[TASK_EVENT_MAX] = {
    [TASK_EV_BEGIN] = "begin",
    [TASK_EV_VIEW_READY] = "view-ready",
    [TASK_EV_UPLOAD_BEGIN] = "upload-begin",
    [TASK_EV_DONE] = "done",
    [TASK_EV_FAIL] = "fail",
};

/* -1: illegal. */
static const int table[TASK_STATE_MAX][TASK_EVENT_MAX] = {
    [TASK_NONE] = {-1, -1, -1, -1, -1},
    [TASK_IMAGE_SNAPSHOT_PENDING] = {TASK_IMAGE_SNAPSHOT, -1, -1, -1, TASK_NONE},
    [TASK_IMAGE_SNAPSHOT] = {-1, TASK_IMAGE_PENDING_UPLOAD, -1, -1, TASK_NONE},
    [TASK_IMAGE_PENDING_UPLOAD] = {-1, -1, TASK_IMAGE_UPLOADING, -1, TASK_NONE},
    [TASK_IMAGE_UPLOADING] = {-1, -1, -1, TASK_NONE, TASK_NONE},
};

const char *
task_state_to_string(enum task_state s)
{
    return (unsigned)s < TASK_STATE_MAX ? state_names[s] : NULL;
}

int
task_state_from_string(const char *s)
{
    if (!s)
        return TASK_NONE;
    for (int i = 1; i < TASK_STATE_MAX; i++)
        if (strcmp(s, state_names[i]) == 0)
            return i;
    return -EINVAL;
}

const char *
task_event_to_string(enum task_event e)
{
    return (unsigned)e < TASK_EVENT_MAX ? event_names[e] : "?";
}

int
task_next(enum task_state s, enum task_event e, enum task_state *ret_state)
{
    if ((unsigned)s >= TASK_STATE_MAX || (unsigned)e >= TASK_EVENT_MAX || table[s][e] < 0)
        return -EINVAL;
    *ret_state = (enum task_state)table[s][e];
    return 0;
}
