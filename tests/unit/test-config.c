/* Unit tests for worker/config.c, table-driven: defaults, every option type with good and bad
 * values, unknown sections and options, several files (later wins), $-references, long lines,
 * and that no error or dump ever shows a password. Each case's files are written to a temporary
 * directory and loaded with config_load() exactly as --config-file would. */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cleanup.h"
#include "config.h"
#include "err.h"
#include "log.h"
#include "test.h"
#include "transport_url.h"
#include "util.h"

typedef void (*check_fn)(const struct agent_config *c);

static void
check_defaults(const struct agent_config *c)
{
    char hn[256] = "";
    gethostname(hn, sizeof(hn));
    CHECK_STREQ(c->host, hn);
    CHECK_STREQ(c->control_exchange, "nova");
    CHECK_STREQ(c->state_path, "/var/lib/nova");
    CHECK_STREQ(c->instances_path, "/var/lib/nova/instances");
    CHECK_STREQ(c->snapshots_directory, "/var/lib/nova/instances/snapshots");
    CHECK(c->max_concurrent_snapshots == 5, "max_concurrent_snapshots %ld", c->max_concurrent_snapshots);
    CHECK_STREQ(c->instance_name_template, "instance-%08x");
    CHECK_STREQ(c->connection_uri, "qemu:///system");
    CHECK(c->images_type == IMAGES_TYPE_QCOW2, "images_type");
    CHECK_STREQ(c->images_rbd_pool, "rbd");
    CHECK(c->snapshot_image_format == SNAPSHOT_FORMAT_SOURCE, "snapshot_image_format");
    CHECK(!c->snapshot_compression && !c->disable_libvirt_livesnapshot, "bools");
    CHECK(util_strv_length(c->glance_api_servers) == 0, "api_servers");
    CHECK(c->glance_num_retries == 3, "num_retries");
    CHECK(!c->amqp_durable_queues && !c->amqp_auto_delete && !c->rabbit_quorum_queue, "queues");
    CHECK(c->heartbeat_timeout_threshold == 60, "heartbeat");
    CHECK(util_strv_length(c->notification_drivers) == 0, "drivers");
    CHECK(util_strv_length(c->notification_topics) == 1 &&
              strcmp(c->notification_topics[0], "notifications") == 0, "topics");
    CHECK(c->notification_format == NOTIFICATION_FORMAT_UNVERSIONED, "format");
    CHECK(util_strv_length(c->versioned_notifications_topics) == 1 &&
              strcmp(c->versioned_notifications_topics[0], "versioned_notifications") == 0,
          "versioned topics");
    CHECK(c->notify_on_state_change == NOTIFY_ON_STATE_CHANGE_NONE, "notify_on_state_change");
    CHECK(c->transport && c->transport->n_brokers == 1 &&
              strcmp(c->transport->brokers[0].host, "localhost") == 0, "transport");
    CHECK(c->notification_transport == NULL, "notification transport");
    CHECK(c->debug_mask == 0, "debug");
}

static void
check_full(const struct agent_config *c)
{
    CHECK_STREQ(c->host, "compute-1");
    CHECK(c->transport->n_brokers == 2, "brokers %zu", c->transport->n_brokers);
    CHECK_STREQ(c->transport->brokers[1].host, "10.0.0.2");
    CHECK_STREQ(c->transport->vhost, "openstack");
    CHECK(c->max_concurrent_snapshots == 0, "unlimited");
    CHECK(c->images_type == IMAGES_TYPE_RBD, "rbd");
    CHECK_STREQ(c->images_rbd_pool, "vms");
    CHECK_STREQ(c->rbd_user, "nova");
    CHECK(c->snapshot_image_format == SNAPSHOT_FORMAT_RAW, "raw");
    CHECK(c->snapshot_compression, "compression");
    CHECK(c->disable_libvirt_livesnapshot, "workaround");
    CHECK(util_strv_length(c->glance_api_servers) == 2, "api_servers");
    CHECK_STREQ(c->glance_api_servers[1], "http://g2:9292");
    CHECK(c->glance_num_retries == 0, "retries");
    CHECK(c->amqp_durable_queues && c->rabbit_quorum_queue && !c->amqp_auto_delete, "queue flags");
    CHECK(c->heartbeat_timeout_threshold == 30 && c->rabbit_qos_prefetch_count == 10, "rabbit ints");
    CHECK(util_strv_length(c->notification_drivers) == 1, "drivers");
    CHECK_STREQ(c->notification_drivers[0], "messagingv2");
    CHECK(util_strv_length(c->notification_topics) == 2, "topics");
    CHECK(c->notification_transport && c->notification_transport->brokers[0].port == 5673,
          "notification transport");
    CHECK(c->notification_format == NOTIFICATION_FORMAT_BOTH, "both");
    CHECK(c->notify_on_state_change == NOTIFY_ON_STATE_CHANGE_VM_AND_TASK_STATE, "state change");
    CHECK(c->debug_mask == ((1u << LOG_RPC) | (1u << LOG_RBD)), "debug mask %x", c->debug_mask);
}

static void
check_later_wins(const struct agent_config *c)
{
    CHECK_STREQ(c->host, "second");
    CHECK_STREQ(c->control_exchange, "first-only");
    CHECK(c->max_concurrent_snapshots == 2, "from third file: %ld", c->max_concurrent_snapshots);
}

static void
check_interpolation(const struct agent_config *c)
{
    CHECK_STREQ(c->state_path, "/srv/nova");
    CHECK_STREQ(c->instances_path, "/srv/nova/instances");
    CHECK_STREQ(c->snapshots_directory, "/srv/nova/instances/snapshots");
    CHECK_STREQ(c->log_file, "/srv/nova/log/$agent.log");
}

static void
check_multi_driver(const struct agent_config *c)
{
    CHECK(util_strv_length(c->notification_drivers) == 2, "%zu drivers",
          util_strv_length(c->notification_drivers));
}

static void
check_long_line(const struct agent_config *c)
{
    CHECK(c->transport->n_brokers == 6, "%zu brokers", c->transport->n_brokers);
    CHECK_STREQ(c->host, "after-long-lines");
}

static void
check_default_alias(const struct agent_config *c)
{
    CHECK(c->images_type == IMAGES_TYPE_QCOW2, "images_type default → qcow2");
    CHECK(c->debug_mask == (1u << LOG_MODULE_MAX) - 1, "debug = True enables all");
}

#define LONG_URL                                                                               \
    "rabbit://nova:pw@broker-number-one.example.org:5672,nova:pw@broker-number-two.example.org:" \
    "5672,nova:pw@broker-number-three.example.org:5672,nova:pw@broker-number-four.example.org:"  \
    "5672,nova:pw@broker-five.example.org:5672,nova:pw@broker-six.example.org:5672/"

struct config_case {
    const char *name;
    const char *files[3];
    int ret;
    const char *err_has; /* substring of the error; "%1" stands for the first file's path */
    check_fn check;
};

static const struct config_case cases[] = {
    {"no file: defaults", {NULL}, 0, NULL, check_defaults},
    {"empty file: defaults", {""}, 0, NULL, check_defaults},
    {"comments and blank lines", {"# comment\n; other\n\n[DEFAULT]\n# host = x\n"}, 0, NULL,
     check_defaults},
    {"full nova.conf",
     {"[DEFAULT]\nhost = compute-1\n"
      "transport_url = rabbit://nova:s3cret@10.0.0.1:5672,nova:s3cret@10.0.0.2:5672/openstack\n"
      "max_concurrent_snapshots = 0\ndebug = rpc, rbd\n"
      "compute_driver = libvirt.LibvirtDriver\nmy_ip = 10.0.0.5\n"
      "[libvirt]\nimages_type = rbd\nimages_rbd_pool = vms\nrbd_user = nova\n"
      "snapshot_image_format = raw\nsnapshot_compression = true\nvirt_type = kvm\n"
      "[workarounds]\ndisable_libvirt_livesnapshot = True\n"
      "[glance]\napi_servers = http://g1:9292, http://g2:9292\nnum_retries = 0\n"
      "[oslo_messaging_rabbit]\namqp_durable_queues = yes\nrabbit_quorum_queue = 1\n"
      "heartbeat_timeout_threshold = 30\nrabbit_qos_prefetch_count = 10\n"
      "[oslo_messaging_notifications]\ndriver = messagingv2\ntopics = notifications,audit\n"
      "transport_url = rabbit://n:p@10.0.0.9:5673/\n"
      "[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n"
      "[keystone_authtoken]\npassword = whatever\n[placement]\nregion_name = R1\n"},
     0, NULL, check_full},
    {"unknown options and sections ignored",
     {"[DEFAULT]\nno_such_option = 1\n[no_such_section]\nhost = ignored\n[libvirt]\nbogus = x\n"},
     0, NULL, check_defaults},
    {"images_type default and debug true", {"[libvirt]\nimages_type = default\n[DEFAULT]\ndebug=True\n"},
     0, NULL, check_default_alias},
    {"several files: later wins",
     {"[DEFAULT]\nhost = first\ncontrol_exchange = first-only\n", "[DEFAULT]\nhost = second\n",
      "[DEFAULT]\nmax_concurrent_snapshots = 2\n"},
     0, NULL, check_later_wins},
    {"$-references",
     {"[DEFAULT]\nstate_path = /srv/nova\nlog_file = ${state_path}/log/$$agent.log\n"}, 0, NULL,
     check_interpolation},
    {"multi driver lines", {"[oslo_messaging_notifications]\ndriver = messagingv2\ndriver = log\n"},
     0, NULL, check_multi_driver},
    {"long lines", {"[DEFAULT]\n# " LONG_URL LONG_URL "\nunknown_long = " LONG_URL LONG_URL
                    "\ntransport_url = " LONG_URL "\nhost = after-long-lines\n"},
     0, NULL, check_long_line},
    {"bad boolean", {"[DEFAULT]\nhost = a\n[libvirt]\nsnapshot_compression = maybe\n"}, -EINVAL,
     "%1:4: [libvirt] snapshot_compression: 'maybe' is not a boolean", NULL},
    {"bad integer", {"[DEFAULT]\nmax_concurrent_snapshots = five\n"}, -EINVAL,
     "%1:2: [DEFAULT] max_concurrent_snapshots: 'five' is not an integer", NULL},
    {"integer out of range", {"[DEFAULT]\nmax_concurrent_snapshots = -1\n"}, -EINVAL,
     "max_concurrent_snapshots: -1 is out of range [0, 1000]", NULL},
    {"bad choice", {"\n[libvirt]\nimages_type = lvm\n"}, -EINVAL,
     "%1:3: [libvirt] images_type: 'lvm' is not one of 'qcow2', 'default', 'rbd'", NULL},
    {"unsupported snapshot format", {"[libvirt]\nsnapshot_image_format = vmdk\n"}, -EINVAL,
     "snapshot_image_format: 'vmdk' is not one of", NULL},
    {"bad transport_url, password not shown",
     {"[DEFAULT]\ntransport_url = rabbit://nova:hunter2@host:notaport/\n"}, -EINVAL,
     "%1:2: [DEFAULT] transport_url: transport_url: bad port", NULL},
    {"bad debug module", {"[DEFAULT]\ndebug = rpc,nosuch\n"}, -EINVAL,
     "[DEFAULT] debug: 'nosuch' is neither a boolean nor a module name", NULL},
    {"unsupported driver", {"[oslo_messaging_notifications]\ndriver = routing\n"}, -EINVAL,
     "unsupported notification driver 'routing'", NULL},
    {"syntax error", {"[DEFAULT]\nhost = a\nthis line has no equals sign\n"}, -EINVAL,
     "%1:3: syntax error", NULL},
    {"error in second file names it",
     {"[DEFAULT]\nhost = ok\n", "[glance]\n\nnum_retries = -4\n"}, -EINVAL, ":3: [glance] num_retries",
     NULL},
    {"unknown $-reference", {"[DEFAULT]\nstate_path = $nosuch/x\n"}, -EINVAL,
     "$nosuch does not name a [DEFAULT] string option", NULL},
    {"$-reference cycle", {"[DEFAULT]\nstate_path = $instances_path\n"}, -ELOOP, "nested too deeply",
     NULL},
    {"long line with a bad known value", {"[DEFAULT]\n\nhost = " LONG_URL "\n"}, -EINVAL,
     "%1:3: [DEFAULT] host", NULL},
};

static int
write_file(const char *dir, int k, const char *text, char *path, size_t size)
{
    snprintf(path, size, "%s/f%d.conf", dir, k);
    FILE *f = fopen(path, "we");
    if (!f)
        return -errno;
    fputs(text, f);
    return fclose(f) == 0 ? 0 : -errno;
}

int
main(void)
{
    char dir[] = "/tmp/ca-test-config-XXXXXX";

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
        const struct config_case *tc = &cases[i];
        char paths[3][256];
        char *argv[3];
        size_t n = 0;
        struct agent_config *cfg = NULL;
        struct agent_err err = {0};

        test_begin(tc->name);
        for (; n < 3 && tc->files[n]; n++) {
            CHECK(write_file(dir, (int)n, tc->files[n], paths[n], sizeof(paths[n])) == 0, "write");
            argv[n] = paths[n];
        }
        int r = config_load(argv, n, &cfg, &err);
        CHECK(r == tc->ret, "ret %d, expected %d (%s)", r, tc->ret, err.msg);
        if (r == 0 && tc->check && cfg)
            tc->check(cfg);
        if (tc->err_has) {
            char want[512];
            const char *p = strstr(tc->err_has, "%1");
            if (p)
                snprintf(want, sizeof(want), "%.*s%s%s", (int)(p - tc->err_has), tc->err_has,
                         paths[0], p + 2);
            else
                snprintf(want, sizeof(want), "%s", tc->err_has);
            CHECK(strstr(err.msg, want), "error '%s' lacks '%s'", err.msg, want);
        }
        CHECK(!strstr(err.msg, "hunter2") && !strstr(err.msg, "s3cret"), "password in error");
        if (cfg) {
            /* The dump shows every option and never a password. */
            char out[] = "/tmp/ca-test-config-dump-XXXXXX";
            int fd = mkstemp(out);
            char buf[16384] = "";
            CHECK(fd >= 0 && config_dump(cfg, fd) == 0, "dump");
            if (fd >= 0) {
                ssize_t k = pread(fd, buf, sizeof(buf) - 1, 0);
                buf[k > 0 ? k : 0] = '\0';
                close(fd);
            }
            unlink(out);
            CHECK(!strstr(buf, "s3cret") && !strstr(buf, ":pw@"), "password in dump");
            size_t lines = 0;
            for (char *p = buf; *p; p++)
                lines += *p == '\n';
            CHECK(lines == config_option_count(), "dump has %zu lines for %zu options", lines,
                  config_option_count());
            if (cfg->transport && strstr(tc->name, "full"))
                CHECK(strstr(buf, "transport_url = rabbit://nova:***@10.0.0.1:5672,"), "dump url");
        }
        config_free(cfg);
        for (size_t k = 0; k < n; k++)
            unlink(paths[k]);
        test_end();
    }

    test_begin("missing file");
    {
        char *argv[] = {(char *)"/nonexistent/nova.conf"};
        struct agent_config *cfg = NULL;
        struct agent_err err = {0};
        CHECK(config_load(argv, 1, &cfg, &err) == -ENOENT, "ret");
        CHECK(strstr(err.msg, "/nonexistent/nova.conf: cannot open"), "msg '%s'", err.msg);
        CHECK(cfg == NULL, "cfg written on failure");
    }
    test_end();

    test_begin("every default is valid and every option is findable");
    for (size_t i = 0; i < config_option_count(); i++) {
        const struct config_option_info *o = config_option_get(i);
        CHECK(config_option_find(o->section, o->name) == o, "find %s.%s", o->section, o->name);
        CHECK(o->help && *o->help, "help for %s.%s", o->section, o->name);
    }
    test_end();

    rmdir(dir);
    return test_done();
}
