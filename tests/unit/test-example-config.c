/* The shipped example config (deploy/compute-agent.conf.example) must stay in step with the
 * option table: it loads cleanly, every option it mentions (set or commented out) is one the
 * agent knows, under the right section, every option the agent knows is mentioned, and each
 * commented-out value is the table's default. Run from the source tree's top directory. */

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "config.h"
#include "err.h"
#include "test.h"

#define EXAMPLE "deploy/compute-agent.conf.example"

int
main(void)
{
    _cleanup_fclose_ FILE *f = fopen(EXAMPLE, "re");
    char line[1024], section[64] = "";
    size_t n = config_option_count();
    _cleanup_free_ int *seen = calloc(n, sizeof(int));
    int lineno = 0;

    test_begin("example loads");
    {
        char *argv[] = {(char *)EXAMPLE};
        struct agent_config *cfg = NULL;
        struct agent_err err = {0};
        CHECK(config_load(argv, 1, &cfg, &err) == 0, "load: %s", err.msg);
        config_free(cfg);
    }
    test_end();

    test_begin("example options are known, defaults match");
    CHECK(f != NULL, "cannot open %s", EXAMPLE);
    while (f && fgets(line, sizeof(line), f)) {
        char *p = line, *eq, *name_end, *val;
        bool commented = false;
        lineno++;
        line[strcspn(line, "\n")] = '\0';
        if (*p == '[') {
            char *rb = strchr(p, ']');
            if (rb) {
                *rb = '\0';
                snprintf(section, sizeof(section), "%s", p + 1);
            }
            continue;
        }
        if (*p == '#') {
            commented = true;
            p++;
        }
        /* An option line is "name = value" with an identifier for a name; prose comments are
         * not options. */
        eq = strstr(p, " =");
        if (!eq || !(islower((unsigned char)*p)))
            continue;
        for (name_end = p; name_end < eq; name_end++)
            if (!(islower((unsigned char)*name_end) || *name_end == '_'))
                break;
        if (name_end != eq)
            continue;
        *name_end = '\0';
        val = eq + 2;
        while (*val == ' ')
            val++;
        const struct config_option_info *o = config_option_find(section, p);
        CHECK(o != NULL, "line %d: [%s] %s is not an option the agent knows", lineno, section, p);
        if (!o)
            continue;
        seen[o - config_option_get(0)]++;
        if (commented)
            CHECK(strcmp(val, o->def) == 0, "line %d: [%s] %s shows '%s', default is '%s'", lineno,
                  section, p, val, o->def);
    }
    test_end();

    test_begin("every option is documented once");
    for (size_t i = 0; i < n; i++) {
        const struct config_option_info *o = config_option_get(i);
        CHECK(seen[i] == 1, "[%s] %s appears %d times in %s", o->section, o->name, seen[i], EXAMPLE);
    }
    test_end();
    return test_done();
}
