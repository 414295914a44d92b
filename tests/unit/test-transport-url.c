/* Unit tests for rpc/transport_url.c: every shape of oslo transport_url an operator may write,
 * and each malformed one with the reason it gets. */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "err.h"
#include "test.h"
#include "transport_url.h"

struct broker_exp {
    const char *host;
    int port;
    const char *user, *password;
};

int
main(void)
{
    static const struct {
        const char *name, *url;
        int ret;
        const char *vhost;
        size_t n;
        struct broker_exp b[3];
        const char *err_has;
    } cases[] = {
        {"simple", "rabbit://nova:secret@127.0.0.1:5672/", 0, "/", 1,
         {{"127.0.0.1", 5672, "nova", "secret"}}, NULL},
        {"default port and guest", "rabbit://broker", 0, "/", 1, {{"broker", 5672, "guest", "guest"}},
         NULL},
        {"vhost", "rabbit://u:p@h:5673/openstack", 0, "openstack", 1, {{"h", 5673, "u", "p"}}, NULL},
        {"vhost %2F", "rabbit://u:p@h/%2F", 0, "/", 1, {{"h", 5672, "u", "p"}}, NULL},
        {"failover list", "rabbit://a:1@h1:5672,b:2@h2:5673,h3/", 0, "/", 3,
         {{"h1", 5672, "a", "1"}, {"h2", 5673, "b", "2"}, {"h3", 5672, "guest", "guest"}}, NULL},
        {"percent-encoded password", "rabbit://nova:p%40ss%3Aw@h/", 0, "/", 1,
         {{"h", 5672, "nova", "p@ss:w"}}, NULL},
        {"ipv6", "rabbit://u:p@[::1]:5672/", 0, "/", 1, {{"::1", 5672, "u", "p"}}, NULL},
        {"query ignored", "rabbit://u:p@h/?heartbeat=30", 0, "/", 1, {{"h", 5672, "u", "p"}}, NULL},
        {"ssl off ok", "rabbit://u:p@h/?ssl=0", 0, "/", 1, {{"h", 5672, "u", "p"}}, NULL},
        {"wrong scheme", "amqp://u:p@h/", -EINVAL, NULL, 0, {{0}}, "scheme"},
        {"no host", "rabbit:///", -EINVAL, NULL, 0, {{0}}, "no broker host"},
        {"empty host after creds", "rabbit://u:p@:5672/", -EINVAL, NULL, 0, {{0}}, "empty host"},
        {"bad port", "rabbit://u:p@h:99999/", -EINVAL, NULL, 0, {{0}}, "bad port"},
        {"port junk", "rabbit://u:p@h:56x/", -EINVAL, NULL, 0, {{0}}, "bad port"},
        {"trailing comma", "rabbit://h1,/", -EINVAL, NULL, 0, {{0}}, "trailing comma"},
        {"empty list item", "rabbit://h1,,h2/", -EINVAL, NULL, 0, {{0}}, "empty host"},
        {"bad escape", "rabbit://u:p%zz@h/", -EINVAL, NULL, 0, {{0}}, "escape"},
        {"truncated escape", "rabbit://u:p%4@h/", -EINVAL, NULL, 0, {{0}}, "escape"},
        {"tls", "rabbit://u:p@h/?ssl=1", -EOPNOTSUPP, NULL, 0, {{0}}, "TLS"},
        {"null", NULL, -EINVAL, NULL, 0, {{0}}, "scheme"},
    };

    for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
        struct rpc_transport_url *u = NULL;
        struct agent_err err = {0};
        test_begin(cases[i].name);
        int r = rpc_transport_url_parse(cases[i].url, &u, &err);
        CHECK(r == cases[i].ret, "ret %d, expected %d (%s)", r, cases[i].ret, err.msg);
        if (r == 0 && u) {
            CHECK_STREQ(u->vhost, cases[i].vhost);
            CHECK(u->n_brokers == cases[i].n, "%zu brokers, expected %zu", u->n_brokers,
                  cases[i].n);
            for (size_t k = 0; k < u->n_brokers && k < cases[i].n; k++) {
                CHECK_STREQ(u->brokers[k].host, cases[i].b[k].host);
                CHECK(u->brokers[k].port == cases[i].b[k].port, "port %d", u->brokers[k].port);
                CHECK_STREQ(u->brokers[k].user, cases[i].b[k].user);
                CHECK_STREQ(u->brokers[k].password, cases[i].b[k].password);
            }
        }
        if (cases[i].err_has)
            CHECK(strstr(err.msg, cases[i].err_has), "error '%s' lacks '%s'", err.msg,
                  cases[i].err_has);
        /* No error message may carry a password. */
        CHECK(!strstr(err.msg, "secret") && !strstr(err.msg, ":p@"), "secret in '%s'", err.msg);
        rpc_transport_url_free(u);
        test_end();
    }

    test_begin("describe hides password");
    {
        struct rpc_transport_url *u = NULL;
        char buf[128];
        CHECK(rpc_transport_url_parse("rabbit://nova:secret@[::1]:5673/", &u, NULL) == 0, "parse");
        if (u) {
            rpc_broker_describe(&u->brokers[0], buf, sizeof(buf));
            CHECK_STREQ(buf, "nova@[::1]:5673");
        }
        rpc_transport_url_free(u);
    }
    test_end();
    return test_done();
}
