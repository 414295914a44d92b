#!/usr/bin/python3
"""The one summary of bench/run.sh: reads the JSON that compare-bench.sh and rbd-bench.sh write
next to their markdown (compare-<date>.json, rbd-<date>.json) and writes <date>.md (one table:
ours / nova's per case, RPC and memory lines, links to the detailed results) and <date>.png (a
bar chart of the time ratios). It aggregates nothing itself: every median and ratio is the one
the bench's own report computed.

  bench/summarize.py RESULTS_DIR STEM WALL_S LOAD_START STATUS

STEM names the files: <STEM>.md and .png are written, compare-<STEM>.json and rbd-<STEM>.json
read (a missing one, or one named in CA_SUMMARY_SKIP: "compare rbd", is reported as not run
or failed). STATUS is one line about how the benches ended.
"""

import json
import os
import platform
import sys

MiB = 1024 * 1024
GiB = 1024 * MiB


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def m3(s, fmt='%.2f', scale=1.0):
    """median (min–max) of a {median, min, max} dict, '–' for None."""
    if not s:
        return '–'
    med, lo, hi = s['median'] / scale, s['min'] / scale, s['max'] / scale
    if fmt % lo == fmt % hi:
        return fmt % med
    return (fmt + ' (' + fmt + '–' + fmt + ')') % (med, lo, hi)


def size(b):
    if b is None:
        return '–'
    if b == 0:
        return '0'
    if b >= GiB:
        return '%.1f GiB' % (b / GiB)
    return '%.0f MiB' % (b / MiB)


def pair(a, b, fmt='%.0f'):
    if not a and not b:
        return '–'
    f = lambda s: fmt % s['median'] if s else '–'
    return '%s / %s' % (f(a), f(b))


def machine():
    mem = 0
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemTotal:'):
                mem = int(line.split()[1]) * 1024
    return '%s: %d cores, %.0f GiB, %s %s' % (platform.node(), os.cpu_count(), mem / GiB,
                                              platform.system(), platform.release())


def main(results, stem, wall_s, load_start, status):
    cmp_name, rbd_name = 'compare-%s' % stem, 'rbd-%s' % stem
    skip = os.environ.get('CA_SUMMARY_SKIP', '').split()
    cmp_ = None if 'compare' in skip else load(os.path.join(results, cmp_name + '.json'))
    rbd = None if 'rbd' in skip else load(os.path.join(results, rbd_name + '.json'))
    wall_s = int(wall_s)
    with open('/proc/loadavg') as f:
        load_end = ' '.join(f.read().split()[:3])
    out = ['# Benchmarks %s' % stem, '',
           '%s. Load average at the start %s, at the end %s. Wall time of bench/run.sh: '
           '%d h %02d min. %s' % (machine(), load_start, load_end, wall_s // 3600,
                                  wall_s % 3600 // 60, status), '',
           'Details: [%s.md](%s.md) (qcow2: the agent against nova\'s own sequence, roofline, RPC, '
           'memory) and [%s.md](%s.md) (Ceph RBD: cast → image active).' % (
               cmp_name, cmp_name, rbd_name, rbd_name), '',
           '| case | pairs | our time, s | nova\'s time, s | **time, ours / nova\'s** | temp bytes '
           'on the host, ours vs nova\'s | temp, ours / nova\'s | freeze ms, ours / nova\'s | '
           'fraction of the roofline, ours / nova\'s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    bars = []          # (label, {median, min, max} of ours / nova's time)
    if cmp_:
        for c in cmp_['cases']:
            label = '%s, %d GiB' % (c['case'], c['gib'])
            t = c['temp_bytes']
            fz = c.get('freeze_ms') or {}
            fr = c['roofline_fraction']
            out.append('| qcow2 %s written | %d | %s | %s | **%s** | %s vs %s | %s | %s | %s |' % (
                label, c['pairs'], m3(c['time_s']['ours'], '%.1f'),
                m3(c['time_s']['nova'], '%.1f'), m3(c['time_ratio']),
                size(t['ours'] and t['ours']['median']), size(t['nova'] and t['nova']['median']),
                m3(c['temp_ratio'], '%.3f'), pair(fz.get('ours'), fz.get('nova')),
                pair(fr['ours'], fr['nova'], '%.2f')))
            bars.append(('qcow2 ' + label, c['time_ratio']))
    else:
        out.append('| qcow2 (compare-bench.sh) | – | not run or failed | | | | | | |')
    if rbd:
        for s in rbd['sizes']:
            a, b = s['contenders']['a'], s['contenders']['b']
            out.append('| rbd, %d GiB written | %d | %s | %s | **%s** | none vs none | – | %s | '
                       '– |' % (s['gib'], s['rounds'], m3(a['cast_to_active_ms'], '%.2f', 1000),
                                m3(b['cast_to_active_ms'], '%.2f', 1000), m3(s['ratio_a_b'], '%.3f'),
                                pair(a['freeze_ms'], b['freeze_ms'])))
            bars.append(('rbd, %d GiB' % s['gib'], s['ratio_a_b']))
    else:
        out.append('| rbd (rbd-bench.sh) | – | not run or failed | | | | | | |')
    out.append('')
    out.append('Ratios are the medians (min–max) of the pairwise ratios, ours / nova\'s, as the '
               'detailed results give them. qcow2: ours = the cast → the agent\'s `done`; nova\'s = '
               'nova 26\'s live (`_live_snapshot`: block copy into a delta, `qemu-img convert`) or '
               'cold (`qemu-img convert`) sequence, then its upload; temp = peak bytes in the '
               'snapshots directory; roofline = the slower of reading the disk and uploading '
               'the same bytes (1.0 = at the bound). rbd: cast → image active in Glance; ours = '
               'contender a (direct clone, background flatten), nova\'s = b (nova\'s '
               'direct_snapshot with its synchronous flatten); neither writes a temporary copy '
               'on the host, and no roofline applies (nothing is streamed).')
    out.append('')
    lines = []
    if rbd:
        for s in rbd['sizes']:
            c = s['contenders']['c']
            lines.append('- rbd, %d GiB: the streamed fallback (c) takes %s s, %s× a\'s time; '
                         'a\'s background flatten ends %s s after the cast.' % (
                             s['gib'], m3(c['cast_to_active_ms'], '%.0f', 1000),
                             m3(s['ratio_c_a'], '%.0f'),
                             m3(s['contenders']['a']['cast_to_flattened_ms'], '%.1f', 1000)))
    if cmp_:
        for d in cmp_.get('rpc') or []:
            lines.append('- RPC, %d agent%s: cast → received p50 / p99 %.1f / %.1f ms; burst %.0f '
                         'casts/s; backlog drained at %.0f casts/s.' % (
                             d['agents'], '' if d['agents'] == 1 else 's', d['lat']['p50'],
                             d['lat']['p99'], d['burst']['rate'], d['backlog']['rate']))
        mem = cmp_.get('memory') or []
        if mem:
            idle = sorted({'%.0f' % (m['idle_kb'] / 1024) for m in mem}, key=float)
            lines.append('- Memory, qcow2 agent: VmRSS idle %s MiB, VmHWM at most %.0f MiB '
                         '(phases: %s).' % (
                             idle[0] if len(idle) == 1 else idle[0] + '–' + idle[-1],
                             max(m['hwm_kb'] for m in mem) / 1024,
                             ', '.join(m['phase'] for m in mem)))
    if rbd:
        rs = [(s['gib'], k, c['rss']) for s in rbd['sizes'] for k, c in s['contenders'].items()
              if c.get('rss')]
        if rs:
            lines.append('- Memory, rbd agents: VmHWM at most %.0f MiB (%s).' % (
                max(r['hwm_kb'] for _, _, r in rs) / 1024,
                ', '.join('%d GiB %s: %.0f' % (g, k, r['hwm_kb'] / 1024) for g, k, r in rs)))
    out.extend(lines)
    if lines:
        out.append('')
    png = os.path.join(results, stem + '.png')
    note = chart(bars, png)
    if note:
        out.append(note)
        out.append('')
    md = os.path.join(results, stem + '.md')
    with open(md, 'w') as f:
        f.write('\n'.join(out) + '\n')
    sys.stdout.write('\n'.join(out) + '\n')
    print('saved %s and %s' % (md, png), file=sys.stderr)


def chart(bars, png):
    bars = [(n, s) for n, s in bars if s]
    if not bars:
        return None
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return '(no chart: python3-matplotlib is missing; deploy/install-packages.sh services)'
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(bars) + 2), 4.5))
    x = range(len(bars))
    med = [s['median'] for _, s in bars]
    lo = [s['median'] - s['min'] for _, s in bars]
    hi = [s['max'] - s['median'] for _, s in bars]
    colors = ['#2b7bba' if n.startswith('qcow2') else '#e08a1e' for n, _ in bars]
    rects = ax.bar(list(x), med, 0.6, yerr=[lo, hi], capsize=3, color=colors)
    ax.bar_label(rects, labels=['%.2f' % m if m >= 0.1 else '%.3f' % m for m in med],
                 fontsize=8, padding=2)
    ax.axhline(1.0, color='k', lw=0.8, ls='--')
    # Log scale: rbd's ratios are ~10x below qcow2's; the axis spans 0.01 (or less) to 2 (or more)
    # so each bar's height reads against 1.
    ax.set_yscale('log')
    ax.set_ylim(min([0.01] + [0.5 * s['min'] for _, s in bars if s['min'] > 0]),
                max([2.0] + [2 * s['max'] for _, s in bars]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: '%g' % v))
    ax.set_xticks(list(x))
    ax.set_xticklabels([n for n, _ in bars], rotation=20, ha='right')
    ax.set_ylabel("time, ours / nova's (median of pairs, min–max)")
    ax.set_title("compute-agent vs nova: below 1 = faster")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return '![time ratios](%s)' % os.path.basename(png)


if __name__ == '__main__':
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
