#pragma once
/* nova's task states for a snapshot and the only transitions a snapshot job may make between
 * them. Pure: task_next() does no I/O; the job performs the side effects (reporting the change,
 * notifications) after the table said yes. */

enum task_state {
    TASK_NONE,                  /* None */
    TASK_IMAGE_SNAPSHOT_PENDING,
    TASK_IMAGE_SNAPSHOT,
    TASK_IMAGE_PENDING_UPLOAD,
    TASK_IMAGE_UPLOADING,
    TASK_STATE_MAX,
};

enum task_event {
    TASK_EV_BEGIN,        /* the job starts: the point in time is being taken */
    TASK_EV_VIEW_READY,   /* the point-in-time view exists: the image can be written */
    TASK_EV_UPLOAD_BEGIN, /* bytes are going to the image service */
    TASK_EV_DONE,         /* the image is active */
    TASK_EV_FAIL,         /* anything failed: back to None (nova's reverts_task_state) */
    TASK_EVENT_MAX,
};

/* nova's spelling ("image_snapshot_pending", …); NULL for TASK_NONE (None). */
const char *task_state_to_string(enum task_state s);

/* Parse nova's spelling; NULL means None. Returns the state or -EINVAL. */
int task_state_from_string(const char *s);

const char *task_event_to_string(enum task_event e);

/* The state event e leads to from s: 0 and *ret_state, or -EINVAL if the table has no such
 * transition (an unexpected task state: nova's UnexpectedTaskStateError). */
int task_next(enum task_state s, enum task_event e, enum task_state *ret_state);
