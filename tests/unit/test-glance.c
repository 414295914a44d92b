/* Unit tests for the pure parts of backends/glance.c: HTTP status to errno, Glance's error text
 * as one line, image status names, and the JSON patch nova's snapshot sends (checked against
 * the body captured in /work/shared/reference/glance/nova-snapshot-http-flow.json). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "err.h"
#include "glance.h"
#include "test.h"

/* A queued image right after nova-api's POST /v2/images (trimmed to what matters). */
static const char queued_image[] =
    "{\"min_disk\": 20, \"min_ram\": 0, \"base_image_ref\": \"155d900f\", \"image_type\":"
    " \"snapshot\", \"my_key\": \"my_value\", \"name\": \"snap-of-some-server\", \"disk_format\":"
    " null, \"container_format\": null, \"visibility\": \"private\", \"size\": null, \"status\":"
    " \"queued\", \"checksum\": null, \"protected\": false, \"os_hidden\": false, \"os_hash_algo\":"
    " null, \"os_hash_value\": null, \"id\": \"4021271f-0003-4e31-96ec-4692b1c88ffc\","
    " \"owner\": null, \"tags\": []}";

int
main(void)
{
    static const struct {
        const char *name;
        long status;
        int ret;
    } statuses[] = {
        {"200", 200, 0},         {"201", 201, 0},           {"204", 204, 0},
        {"302", 302, -EPROTO},   {"400", 400, -EINVAL},     {"401", 401, -EACCES},
        {"403", 403, -EACCES},   {"404", 404, -ENOENT},     {"409", 409, -EBUSY},
        {"410", 410, -ENOENT},   {"413", 413, -EFBIG},      {"415", 415, -EINVAL},
        {"500", 500, -EIO},      {"503", 503, -EIO},        {"0 (none)", 0, -EIO},
    };
    for (size_t i = 0; i < ELEMENTSOF(statuses); i++) {
        test_begin(statuses[i].name);
        int r = glance_http_status_to_errno(statuses[i].status);
        CHECK(r == statuses[i].ret, "got %d, expected %d", r, statuses[i].ret);
        test_end();
    }

    static const struct {
        const char *name, *body;
        size_t size;
        const char *expected;
    } texts[] = {
        {"json message",
         "{\"message\": \"No image found with ID 00000000<br /><br />\\n\\n\\n\", \"code\":"
         " \"404 Not Found\", \"title\": \"Not Found\"}",
         256, "No image found with ID 00000000"},
        {"json conflict two lines",
         "{\"message\": \"There was a conflict when trying to complete your request.<br /><br />"
         "\\nProperty nope does not exist.\\n\\n\", \"code\": \"409 Conflict\"}",
         256, "There was a conflict when trying to complete your request. Property nope does not"
              " exist."},
        {"json title only", "{\"code\": \"413\", \"title\": \"Request Entity Too Large\"}", 256,
         "Request Entity Too Large"},
        {"json nested error", "{\"error\": {\"message\": \"The request you have made requires"
         " authentication.\", \"code\": 401}}", 256,
         "The request you have made requires authentication."},
        {"html page",
         "<html>\n <head>\n  <title>404 Not Found</title>\n </head>\n <body>\n  <h1>404 Not"
         " Found</h1>\n  No image found with ID 0000<br /><br />\n\n\n\n </body>\n</html>",
         256, "No image found with ID 0000"},
        {"plain text", "  Service Unavailable\r\n\tretry later  ", 256,
         "Service Unavailable retry later"},
        {"entities", "{\"message\": \"a &lt;b&gt; &amp; &#39;c&#39; &quot;d&quot;\"}", 256,
         "a <b> & 'c' \"d\""},
        {"empty", "", 256, ""},
        {"truncated", "{\"message\": \"abcdefghij\"}", 5, "abcd"},
        {"truncated at space", "{\"message\": \"abc defgh\"}", 5, "abc"},
        {"utf-8 not split", "{\"message\": \"ab\\u00e9\"}", 4, "ab"},
        {"control bytes dropped", "x\001y", 256, "xy"},
    };
    for (size_t i = 0; i < ELEMENTSOF(texts); i++) {
        char buf[256];
        test_begin(texts[i].name);
        memset(buf, 'Z', sizeof(buf));
        size_t n = glance_error_text(texts[i].body, strlen(texts[i].body), buf, texts[i].size);
        CHECK_STREQ(buf, texts[i].expected);
        CHECK(n == strlen(texts[i].expected), "returned %zu", n);
        test_end();
    }

    test_begin("status names");
    for (int s = 0; s < GLANCE_IMAGE_STATUS_MAX; s++) {
        const char *name = glance_image_status_to_string((enum glance_image_status)s);
        CHECK(name != NULL, "status %d has no name", s);
        if (name && s != GLANCE_IMAGE_STATUS_UNKNOWN)
            CHECK(glance_image_status_from_string(name) == (enum glance_image_status)s,
                  "round trip of %s", name);
    }
    CHECK(glance_image_status_from_string("bogus") == GLANCE_IMAGE_STATUS_UNKNOWN, "bogus");
    CHECK(glance_image_status_from_string(NULL) == GLANCE_IMAGE_STATUS_UNKNOWN, "NULL");
    CHECK(glance_image_status_to_string(GLANCE_IMAGE_STATUS_MAX) == NULL, "MAX has no name");
    test_end();

    /* nova's libvirt snapshot metadata (purge_props=False): three new properties, the two
     * formats that exist as null; the name is unchanged so warlock sends nothing for it. */
    static const struct glance_prop nova_props[] = {
        {"image_location", "snapshot"},
        {"image_state", "available"},
        {"owner_id", "6f70656e737461636b20342065766572"},
        {"name", "snap-of-some-server"},
        {"disk_format", "qcow2"},
        {"container_format", "bare"},
    };
    static const struct glance_prop typed[] = {
        {"min_disk", "40"}, {"min_ram", "0"}, {"protected", "true"}, {"my_key", "other"},
    };
    static const struct glance_prop removals[] = {
        {"my_key", NULL}, {"absent_key", NULL}, {"base_image_ref", "155d900f"},
    };
    static const struct glance_prop escaped[] = {{"a/b~c", "v"}};
    static const struct glance_prop readonly[] = {{"status", "active"}};
    static const struct glance_prop remove_core[] = {{"disk_format", NULL}};
    static const struct glance_prop bad_int[] = {{"min_ram", "lots"}};
    static const struct glance_prop no_name[] = {{"", "x"}};
    static const struct {
        const char *name, *image;
        const struct glance_prop *props;
        size_t n;
        int ret;
        const char *expected;
    } patches[] = {
        {"nova snapshot", queued_image, nova_props, ELEMENTSOF(nova_props), 0,
         "[{\"op\":\"add\",\"path\":\"/image_location\",\"value\":\"snapshot\"},"
         "{\"op\":\"add\",\"path\":\"/image_state\",\"value\":\"available\"},"
         "{\"op\":\"add\",\"path\":\"/owner_id\",\"value\":\"6f70656e737461636b20342065766572\"},"
         "{\"op\":\"replace\",\"path\":\"/disk_format\",\"value\":\"qcow2\"},"
         "{\"op\":\"replace\",\"path\":\"/container_format\",\"value\":\"bare\"}]"},
        {"typed values", queued_image, typed, ELEMENTSOF(typed), 0,
         "[{\"op\":\"replace\",\"path\":\"/min_disk\",\"value\":40},"
         "{\"op\":\"replace\",\"path\":\"/protected\",\"value\":true},"
         "{\"op\":\"replace\",\"path\":\"/my_key\",\"value\":\"other\"}]"},
        {"removals", queued_image, removals, ELEMENTSOF(removals), 0,
         "[{\"op\":\"remove\",\"path\":\"/my_key\"}]"},
        {"pointer escaping", queued_image, escaped, ELEMENTSOF(escaped), 0,
         "[{\"op\":\"add\",\"path\":\"/a~1b~0c\",\"value\":\"v\"}]"},
        {"nothing to do", queued_image, NULL, 0, 0, "[]"},
        {"read-only attribute", queued_image, readonly, ELEMENTSOF(readonly), -EINVAL, NULL},
        {"remove core attribute", queued_image, remove_core, ELEMENTSOF(remove_core), -EINVAL,
         NULL},
        {"integer expected", queued_image, bad_int, ELEMENTSOF(bad_int), -EINVAL, NULL},
        {"empty name", queued_image, no_name, ELEMENTSOF(no_name), -EINVAL, NULL},
        {"image not JSON", "<html>", nova_props, ELEMENTSOF(nova_props), -EINVAL, NULL},
        {"image not an object", "[]", nova_props, ELEMENTSOF(nova_props), -EINVAL, NULL},
    };
    for (size_t i = 0; i < ELEMENTSOF(patches); i++) {
        struct agent_err err = {0};
        _cleanup_free_ char *patch = NULL;
        test_begin(patches[i].name);
        int r = glance_patch_build(patches[i].image, patches[i].props, patches[i].n, &patch,
                                   &err);
        CHECK(r == patches[i].ret, "ret %d, expected %d (%s)", r, patches[i].ret, err.msg);
        if (r == 0)
            CHECK_STREQ(patch, patches[i].expected);
        else
            CHECK(patch == NULL && err.code == r && err.msg[0], "error report: %d '%s'",
                  err.code, err.msg);
        test_end();
    }

    return test_done();
}
