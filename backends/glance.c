/* The image service client (Glance v2 over HTTP). This file is the only user of libcurl in the
 * agent. For now it holds libcurl's process-wide setup; the upload path comes with the snapshot
 * work. */

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>

#include "backend.h"
#include "err.h"

int
http_global_init(struct agent_err *err)
{
    CURLcode c = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (c != CURLE_OK)
        return agent_err_set(err, -EIO, "libcurl: curl_global_init: %s", curl_easy_strerror(c));
    return 0;
}

void
http_global_cleanup(void)
{
    curl_global_cleanup();
}

size_t
http_library_versions(char *buf, size_t size)
{
    int n = snprintf(buf, size, "libcurl %s\n", curl_version_info(CURLVERSION_NOW)->version);
    return n < 0 ? 0 : (size_t)n;
}
