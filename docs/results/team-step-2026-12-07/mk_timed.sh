rm -rf /tmp/w/timed && mkdir -p /tmp/w/timed && cp -r /work/main/fleetlm/kernels/csrc /tmp/w/timed/ && cd /tmp/w/timed/csrc && python3 - <<'EOF'
p = 'decode_stack.c'
s = open(p).read()
a = '''static int stage_status(const Team *t, int status, int stage)
{
    team_fail(t, status ? stage * 16 + status : 0);
    team_sync(t);
    return team_status(t);
}'''
assert a in s
s = s.replace(a, '''#include <time.h>
double fleet_times[4][16]; /* [thread][stage*2 + (0 work, 1 wait)] */
static __thread double last_mark;
static double now_s(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
void fleet_times_read(double *out) { memcpy(out, fleet_times, sizeof fleet_times); memset(fleet_times, 0, sizeof fleet_times); }
static int stage_status(const Team *t, int status, int stage)
{
    double a = now_s();
    if (last_mark > 0 && t->id < 4) fleet_times[t->id][stage * 2] += a - last_mark;
    team_fail(t, status ? stage * 16 + status : 0);
    team_sync(t);
    double b = now_s();
    if (t->id < 4) fleet_times[t->id][stage * 2 + 1] += b - a;
    last_mark = b;
    return team_status(t);
}''')
b = '''    for (int64_t l = 0; l < num_layers; l++) {
        const LayerWeights *w = &layers[l];
        if (t->id == 0) *failed_layer = l;'''
assert b in s
s = s.replace(b, '    last_mark = now_s();\n' + b)
open(p, 'w').write(s)
EOF
