/* Unit tests for worker/task.c: every (state, event) pair of the snapshot task-state table, the
 * happy path as nova walks it, and the names as nova spells them. */

#include <errno.h>

#include "cleanup.h"
#include "task.h"
#include "test.h"

int
main(void)
{
    static const struct {
        const char *name;
        enum task_state from;
        enum task_event ev;
        int ret;
        enum task_state to;
    } cases[] = {
        {"pending begins", TASK_IMAGE_SNAPSHOT_PENDING, TASK_EV_BEGIN, 0, TASK_IMAGE_SNAPSHOT},
        {"snapshot view ready", TASK_IMAGE_SNAPSHOT, TASK_EV_VIEW_READY, 0, TASK_IMAGE_PENDING_UPLOAD},
        {"upload begins", TASK_IMAGE_PENDING_UPLOAD, TASK_EV_UPLOAD_BEGIN, 0, TASK_IMAGE_UPLOADING},
        {"upload done", TASK_IMAGE_UPLOADING, TASK_EV_DONE, 0, TASK_NONE},
        {"fail from pending", TASK_IMAGE_SNAPSHOT_PENDING, TASK_EV_FAIL, 0, TASK_NONE},
        {"fail from snapshot", TASK_IMAGE_SNAPSHOT, TASK_EV_FAIL, 0, TASK_NONE},
        {"fail from pending upload", TASK_IMAGE_PENDING_UPLOAD, TASK_EV_FAIL, 0, TASK_NONE},
        {"fail from uploading", TASK_IMAGE_UPLOADING, TASK_EV_FAIL, 0, TASK_NONE},
        {"None cannot begin (unexpected task state)", TASK_NONE, TASK_EV_BEGIN, -EINVAL, 0},
        {"None cannot fail", TASK_NONE, TASK_EV_FAIL, -EINVAL, 0},
        {"no skipping to upload", TASK_IMAGE_SNAPSHOT, TASK_EV_UPLOAD_BEGIN, -EINVAL, 0},
        {"no done before upload", TASK_IMAGE_PENDING_UPLOAD, TASK_EV_DONE, -EINVAL, 0},
        {"no second begin", TASK_IMAGE_SNAPSHOT, TASK_EV_BEGIN, -EINVAL, 0},
        {"out of range state", TASK_STATE_MAX, TASK_EV_BEGIN, -EINVAL, 0},
        {"out of range event", TASK_IMAGE_SNAPSHOT, TASK_EVENT_MAX, -EINVAL, 0},
    };
    int legal = 0;

    for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
        enum task_state to = TASK_STATE_MAX;
        test_begin(cases[i].name);
        int r = task_next(cases[i].from, cases[i].ev, &to);
        CHECK(r == cases[i].ret, "ret %d, expected %d", r, cases[i].ret);
        if (r == 0)
            CHECK(to == cases[i].to, "to %d, expected %d", to, cases[i].to);
        else
            CHECK(to == TASK_STATE_MAX, "output written on failure");
        test_end();
    }

    test_begin("exactly 8 legal transitions");
    for (int s = 0; s < TASK_STATE_MAX; s++)
        for (int e = 0; e < TASK_EVENT_MAX; e++) {
            enum task_state to;
            legal += task_next((enum task_state)s, (enum task_event)e, &to) == 0;
        }
    CHECK(legal == 8, "%d legal transitions", legal);
    test_end();

    test_begin("names round-trip as nova spells them");
    for (int s = 0; s < TASK_STATE_MAX; s++)
        CHECK(task_state_from_string(task_state_to_string((enum task_state)s)) == s, "state %d", s);
    CHECK(task_state_from_string("image_snapshot_pending") == TASK_IMAGE_SNAPSHOT_PENDING, "pending");
    CHECK(task_state_from_string("rebooting") == -EINVAL, "foreign state");
    CHECK(task_state_to_string(TASK_NONE) == NULL, "None");
    test_end();
    return test_done();
}
