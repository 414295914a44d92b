#!/usr/bin/python3
"""Helper of bench/compare-bench.sh: the agent against nova's own snapshot sequence.

Subcommands (run under Debian's /usr/bin/python3, which has python3-libvirt and requests):

  sample OUT CONSOLE SCRATCH EXCLUDE...
      until SIGTERM: every CA-HB heartbeat line the guest prints on CONSOLE, stamped with the
      host time it was seen (console polled every 10 ms), and every 100 ms the allocated bytes
      under SCRATCH and the whole machine's /tmp + /var/tmp (the EXCLUDE dirs left out).
  nova-live URI DOMAIN IMAGE SNAPDIR GLANCE   nova's _live_snapshot + upload (see nova_live()).
  nova-cold DISK IMAGE SNAPDIR GLANCE          nova's cold snapshot_extract + upload.
  run CONF CONTENDER MODE GIB PAIR             one measured snapshot; one JSON line on stdout.
  roofline CONF GIB BYTES REPS                 read and upload bounds; one JSON line.
  rpc-latency SENT_JSONL AGENT_LOG...          cast -> received latencies (ms); one JSON line.
  table CONF OUT_MD OUT_PNG                    the results table and chart; the same figures
                                               as JSON in OUT_MD with .json for its suffix.

Nova's sequence is written from nova 26 (Debian python3-nova) as installed here:
nova/virt/libvirt/driver.py snapshot() and _live_snapshot(), nova/virt/libvirt/utils.py
create_image() / extract_snapshot(), nova/privsep/qemu.py unprivileged_convert_image(),
nova/image/glance.py _update_v2() and glanceclient's 64 KiB chunked PUT. It is a script, not
nova-compute: no RPC, no conductor, no task-state updates, which only flatters nova's side.
"""

import datetime
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

MiB = 1024 * 1024
CHUNK = 64 * 1024        # glanceclient's CHUNKSIZE


def now_ms():
    return time.time() * 1000


# --------------------------------------------------------------------------------------------
# sampler

def dir_bytes(path, exclude=(), dev=None):
    """Allocated bytes of the regular files under path (one filesystem, no symlinks)."""
    total = 0
    try:
        it = os.scandir(path)
    except OSError:
        return 0
    with it:
        for e in it:
            if e.path in exclude:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if dev is not None and st.st_dev != dev:
                continue
            if e.is_dir(follow_symlinks=False):
                total += dir_bytes(e.path, exclude, st.st_dev)
            elif e.is_file(follow_symlinks=False):
                total += st.st_blocks * 512
    return total


def sample(out, console, scratch, *exclude):
    exclude = set(p.rstrip('/') for p in exclude)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    lock = threading.Lock()
    f = open(out, 'w')

    def put(line):
        with lock:
            f.write(line + '\n')
            f.flush()

    def hb():
        pos = os.path.getsize(console) if os.path.exists(console) else 0
        tail = b''
        while not stop.is_set():
            try:
                with open(console, 'rb') as c:
                    c.seek(pos)
                    data = c.read()
            except OSError:
                data = b''
            if data:
                pos += len(data)
                t = now_ms()
                tail += data
                *lines, tail = tail.split(b'\n')
                for _ in range(sum(1 for line in lines if b'CA-HB' in line)):
                    put('hb %d' % t)
            stop.wait(0.01)

    th = threading.Thread(target=hb, daemon=True)
    th.start()
    nxt = time.monotonic()
    while not stop.is_set():
        tmp = sum(dir_bytes(top, exclude) for top in ('/tmp', '/var/tmp'))
        put('t %d %d %d' % (now_ms(), dir_bytes(scratch), tmp))
        nxt += 0.1
        stop.wait(max(0.0, nxt - time.monotonic()))
    th.join(1)
    f.close()


# --------------------------------------------------------------------------------------------
# Glance, as nova's image API talks to it (no auth in the deploy/ Glance)

def glance_session():
    import requests
    return requests.Session()


def glance_create(s, glance, name, instance_uuid, min_disk):
    """The image nova-api creates before casting (compute_utils.create_image)."""
    r = s.post(glance + '/v2/images', json={
        'name': name, 'container_format': 'bare', 'disk_format': 'qcow2',
        'min_disk': min_disk, 'min_ram': 0, 'instance_uuid': instance_uuid,
        'image_type': 'snapshot', 'base_image_ref': '155d900f-4e14-4e4c-a73d-069cbf4541e6',
        'visibility': 'private'}, timeout=60)
    r.raise_for_status()
    return r.json()['id']


def glance_upload(glance, image, path):
    """nova's image API update(): PATCH the snapshot's metadata, then glanceclient's upload, a
    chunked PUT of the file read 64 KiB at a time. Returns (bytes sent, patch ms, put ms)."""
    s = glance_session()
    t0 = now_ms()
    patch = [
        {'op': 'replace', 'path': '/disk_format', 'value': 'qcow2'},
        {'op': 'replace', 'path': '/container_format', 'value': 'bare'},
        {'op': 'add', 'path': '/image_location', 'value': 'snapshot'},
        {'op': 'add', 'path': '/image_state', 'value': 'available'},
        {'op': 'add', 'path': '/owner_id', 'value': '6f70656e737461636b20342065766572'},
    ]
    r = s.patch('%s/v2/images/%s' % (glance, image), data=json.dumps(patch), timeout=60,
                headers={'Content-Type': 'application/openstack-images-v2.1-json-patch'})
    r.raise_for_status()
    t1 = now_ms()
    sent = [0]

    def body(f):
        while True:
            b = f.read(CHUNK)
            if not b:
                return
            sent[0] += len(b)
            yield b

    with open(path, 'rb') as f:
        r = s.put('%s/v2/images/%s/file' % (glance, image), data=body(f), timeout=3600,
                  headers={'Content-Type': 'application/octet-stream'})
    r.raise_for_status()
    t2 = now_ms()
    # glance.py _update_v2 reads the image back after the upload.
    s.get('%s/v2/images/%s' % (glance, image), timeout=60).raise_for_status()
    return sent[0], t1 - t0, now_ms() - t1, t2


# --------------------------------------------------------------------------------------------
# nova's sequence

def qemu_img(*args):
    """As nova's processutils.execute: C locale, output captured, failure raises."""
    env = dict(os.environ, LC_ALL='C', LANG='C')
    return subprocess.run(('qemu-img',) + args, env=env, check=True, capture_output=True,
                          text=True).stdout


def img_info(path):
    return json.loads(qemu_img('info', path, '--force-share', '--output=json'))


def supports_direct_io(dirpath):
    """nova.privsep.utils.supports_direct_io: can a file here be opened with O_DIRECT?"""
    p = os.path.join(dirpath, '.directio.test')
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(p)
        except OSError:
            pass


def convert(src, dst, fmt, snapdir):
    cache = 'none' if supports_direct_io(snapdir) else 'writeback'
    qemu_img('convert', '-t', cache, '-O', 'qcow2', '-f', fmt, src, dst)


def nova_tempdir(snapdir):
    """utils.tempdir(dir=snapshots_directory): a fresh dir, removed afterwards."""
    os.makedirs(snapdir, exist_ok=True)
    d = os.path.join(snapdir, 'tmp' + uuid.uuid4().hex[:8])
    os.mkdir(d)
    return d


def rmtree(d):
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def finish(r, t0):
    r['total_ms'] = now_ms() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rc = resource.getrusage(resource.RUSAGE_CHILDREN)
    r['cpu_self_s'] = ru.ru_utime + ru.ru_stime
    r['cpu_children_s'] = rc.ru_utime + rc.ru_stime
    r['maxrss_kb'] = ru.ru_maxrss
    r['children_maxrss_kb'] = rc.ru_maxrss
    print(json.dumps(r), flush=True)


def mirror_ready(dom, target):
    """nova's BlockDevice.is_job_complete(): no job, or cur == end and the disk's <mirror>
    says ready='yes'."""
    from xml.etree import ElementTree
    info = dom.blockJobInfo(target, 0)
    if not info:
        return True
    if info['cur'] != info['end']:
        return False
    for d in ElementTree.fromstring(dom.XMLDesc(0)).findall('./devices/disk'):
        t = d.find('target')
        if t is not None and t.get('dev') == target:
            m = d.find('mirror')
            return m is not None and m.get('ready') == 'yes'
    return False


def nova_live(uri, domain, image, snapdir, glance):
    """driver.snapshot() for a running qcow2 instance with image_hw_qemu_guest_agent=yes:
    tempdir in snapshots_directory, _live_snapshot (delta over the disk's backing file, undefine,
    shallow block copy into it, wait for the mirror, quiesce, abort, redefine, unquiesce),
    extract_snapshot (qemu-img convert of the delta), upload, tempdir removed."""
    import libvirt
    from xml.etree import ElementTree
    libvirt.registerErrorHandler(lambda *a: None, None)
    t0 = now_ms()
    r = {'path': 'nova-blockcopy'}
    conn = libvirt.open(uri)
    dom = conn.lookupByUUIDString(domain)
    tree = ElementTree.fromstring(dom.XMLDesc(0))
    disk = next(d for d in tree.findall('./devices/disk') if d.get('device') == 'disk')
    target, disk_path = disk.find('target').get('dev'), disk.find('source').get('file')
    tmpdir = nova_tempdir(snapdir)
    try:
        out_path = os.path.join(tmpdir, uuid.uuid4().hex)
        os.chmod(tmpdir, 0o701)
        # _live_snapshot
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        try:
            dom.blockJobAbort(target, 0)
        except libvirt.libvirtError:
            pass
        info = img_info(disk_path)
        size = info['virtual-size']
        backing = info.get('full-backing-filename') or info['backing-filename']
        binfo = img_info(backing)
        if binfo.get('backing-filename'):
            raise RuntimeError('base image failed safety check (it has a backing file)')
        delta = out_path + '.delta'
        opts = 'backing_file=%s,backing_fmt=%s' % (backing, binfo['format'])
        if binfo.get('cluster-size'):
            opts += ',cluster_size=%d' % binfo['cluster-size']
        qemu_img('create', '-f', 'qcow2', '-o', opts, delta, str(size))
        t1 = now_ms()
        r['delta_create_ms'] = t1 - t0
        undefined = False
        quiesced = False
        t_freeze = t_thaw = None
        try:
            if dom.isPersistent():
                try:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                except libvirt.libvirtError:
                    dom.undefine()
                undefined = True
            flags = (libvirt.VIR_DOMAIN_BLOCK_REBASE_SHALLOW |
                     libvirt.VIR_DOMAIN_BLOCK_REBASE_REUSE_EXT |
                     libvirt.VIR_DOMAIN_BLOCK_REBASE_COPY)
            dom.blockRebase(target, delta, 0, flags)
            while not mirror_ready(dom, target):
                time.sleep(0.5)
            t2 = now_ms()
            r['mirror_ms'] = t2 - t1
        finally:
            t2 = now_ms()
            try:
                t_freeze = now_ms()
                dom.fsFreeze(None, 0)
                quiesced = True
            except libvirt.libvirtError as e:
                r['quiesce_error'] = str(e)
            try:
                dom.blockJobAbort(target, 0)
            finally:
                if undefined:
                    conn.defineXML(xml)
                if quiesced:
                    dom.fsThaw(None, 0)
                    t_thaw = now_ms()
        t3 = now_ms()
        r['abort_ms'] = t3 - t2
        r['freeze_ms'] = (t_thaw - t_freeze) if quiesced else 0
        r['freeze_start_ms'], r['freeze_end_ms'] = t_freeze, t_thaw
        r['pit_end_ms'] = t3
        r['delta_bytes'] = os.stat(delta).st_blocks * 512
        # extract_snapshot: the delta (backed by the disk's base) flattened to qcow2.
        convert(delta, out_path, 'qcow2', tmpdir)
        t4 = now_ms()
        r['convert_ms'] = t4 - t3
        r['out_bytes'] = os.stat(out_path).st_blocks * 512
        sent, patch_ms, put_ms, _ = glance_upload(glance, image, out_path)
        t5 = now_ms()
        r.update(sent=sent, patch_ms=patch_ms, upload_ms=t5 - t4, put_ms=put_ms,
                 upload_start_ms=t4)
    finally:
        t5 = now_ms()
        rmtree(tmpdir)
        r['cleanup_ms'] = now_ms() - t5
        conn.close()
    r['t0_ms'] = t0
    finish(r, t0)


def nova_cold(disk_path, image, snapdir, glance):
    """driver.snapshot() for a shut-off qcow2 instance: tempdir, snapshot_extract (qemu-img
    convert of the disk's chain), upload, tempdir removed."""
    t0 = now_ms()
    r = {'path': 'nova-cold'}
    tmpdir = nova_tempdir(snapdir)
    try:
        out_path = os.path.join(tmpdir, uuid.uuid4().hex)
        fmt = img_info(disk_path)['format']
        t1 = now_ms()
        r['pit_end_ms'] = t1
        convert(disk_path, out_path, fmt, tmpdir)
        t2 = now_ms()
        r['convert_ms'] = t2 - t1
        r['out_bytes'] = os.stat(out_path).st_blocks * 512
        sent, patch_ms, put_ms, _ = glance_upload(glance, image, out_path)
        t3 = now_ms()
        r.update(sent=sent, patch_ms=patch_ms, upload_ms=t3 - t2, put_ms=put_ms,
                 upload_start_ms=t2, freeze_ms=0)
    finally:
        t3 = now_ms()
        rmtree(tmpdir)
        r['cleanup_ms'] = now_ms() - t3
    r['t0_ms'] = t0
    finish(r, t0)


# --------------------------------------------------------------------------------------------
# one measured run

def ticks(pid, children=True):
    """utime + stime (+ waited-for children) of pid, in seconds; None if it is gone."""
    try:
        f = open('/proc/%s/stat' % pid).read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None
    t = int(f[11]) + int(f[12])
    if children:
        t += int(f[13]) + int(f[14])
    return t / os.sysconf('SC_CLK_TCK')


def machine_ticks():
    v = [int(x) for x in open('/proc/stat').readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def log_ts(line):
    return datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S.%f').replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000


def pidof(path):
    try:
        return int(open(path).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_log(logf, pattern, timeout):
    rx = re.compile(pattern)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(logf, errors='replace') as f:
            for line in f:
                if rx.search(line):
                    return line
        time.sleep(0.1)
    return None


def run(conf_path, contender, mode, gib, pair):
    c = json.load(open(conf_path))
    g = c['glance']
    s = glance_session()
    img = glance_create(s, g, 'compare-%s-%s-%sg-%s' % (contender, mode, gib, pair),
                        c['uuid'], c['virt_gib'])
    with open(c['images_file'], 'a') as f:
        f.write(img + '\n')
    r = {'contender': contender, 'mode': mode, 'gib': int(gib), 'pair': int(pair), 'image': img}
    prefix = os.path.join(c['bench'], 'run-%s-%s-%s-%s' % (mode, gib, pair, contender))
    scratch = c['agent_scratch'] if contender == 'agent' else c['nova_snapdir']
    smp = subprocess.Popen([sys.executable, os.path.abspath(__file__), 'sample', prefix + '.smp',
                            c['console'], scratch, c['deploy_dir'], c['bench']])
    glance_pid = pidof(c['glance_pidfile'])
    qemu_pid = pidof(c['qemu_pidfile']) if mode == 'live' else None
    agent_pid = c['agent_pid']
    try:
        time.sleep(c['idle_s'])
        cpu0 = {'agent': ticks(agent_pid), 'glance': ticks(glance_pid),
                'qemu': ticks(qemu_pid) if qemu_pid else None}
        m0 = machine_ticks()
        if contender == 'agent':
            cast = [c['py'], c['client'], 'cast', '--config', c['oslo_conf'], '--host', c['host'],
                    '--instance-uuid', c['uuid'], '--image-id', img,
                    '--sysmeta', 'image_hw_qemu_guest_agent=yes']
            if mode == 'cold':
                cast += ['--vm-state', 'stopped', '--power-state', '4']
            out = subprocess.run(cast, capture_output=True, text=True, timeout=120)
            t_cast = None
            for line in out.stdout.splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if d.get('image_id') == img:
                    t_cast = d['t_unix'] * 1000
            if t_cast is None:
                raise RuntimeError('cast failed: %s' % out.stderr[-300:])
            end = wait_log(c['agent_log'], r'snapshot to image %s (done|failed|refused)|image %s '
                           r'not found' % (img, img), 1800)
            if not end or 'done' not in end:
                raise RuntimeError('agent: %s' % (end or 'timed out').strip()[-300:])
            r.update(agent_phases(c['agent_log'], img, t_cast))
            t_begin, t_end = t_cast, r['t_done']
            cpu1 = ticks(agent_pid)
            r['cpu_contender_s'] = cpu1 - cpu0['agent']
        else:
            args = ([c['uri'], c['uuid'], img, c['nova_snapdir'], g] if mode == 'live' else
                    [c['disk'], img, c['nova_snapdir'], g])
            t_begin = now_ms()
            p = subprocess.Popen([c['py'], os.path.abspath(__file__), 'nova-' + mode] + args,
                                 stdout=subprocess.PIPE, stderr=open(prefix + '.err', 'w'),
                                 text=True)
            outp = p.stdout.read()
            _, status, ru = os.wait4(p.pid, 0)
            t_end = now_ms()
            if status != 0:
                raise RuntimeError('nova-%s failed: %s' % (mode, open(prefix + '.err').read()[-500:]))
            d = json.loads(outp.strip().splitlines()[-1])
            r.update(d)
            r['total_ms'] = t_end - t_begin
            r['cpu_contender_s'] = ru.ru_utime + ru.ru_stime    # the script + its qemu-img runs
            r['pit_ms'] = d['pit_end_ms'] - t_begin
            r['convert_ms'] = d.get('convert_ms')
            r['rest_ms'] = r['total_ms'] - r['pit_ms'] - d['convert_ms'] - d['upload_ms']
        # None if glance-api was restarted meanwhile (another job on this machine).
        gl = ticks(glance_pid) if glance_pid else None
        r['cpu_glance_s'] = gl - cpu0['glance'] if gl is not None and cpu0['glance'] is not None \
            else None
        if qemu_pid and cpu0['qemu'] is not None:
            q = ticks(qemu_pid)
            r['cpu_qemu_s'] = q - cpu0['qemu'] if q is not None else None
        m1 = machine_ticks()
        r['machine_busy_pct'] = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        time.sleep(0.3)
    finally:
        smp.terminate()
        smp.wait()
    # Heartbeats and temporary bytes.
    hb, tmp = [], []
    for line in open(prefix + '.smp'):
        f = line.split()
        if f[0] == 'hb':
            hb.append(int(f[1]))
        elif f[0] == 't' and len(f) == 4:
            tmp.append([int(x) for x in f[1:]])
    gaps = [(b - a, a, b) for a, b in zip(hb, hb[1:])]
    r['hb_gap_idle_ms'] = max([x for x, a, b in gaps if b < t_begin], default=None)
    if mode == 'live':
        r['hb_gap_ms'] = max([x for x, a, b in gaps if b >= t_begin and a <= t_end], default=None)
        r['hb_count'] = sum(1 for x in hb if t_begin <= x <= t_end)
    before = [s for s in tmp if s[0] < t_begin]
    during = [s for s in tmp if t_begin <= s[0] <= t_end + 200]
    base = statistics.median(s[2] for s in before) if before else (tmp[0][2] if tmp else 0)
    r['scratch_peak'] = max((s[1] for s in during), default=0)
    r['tmp_growth_peak'] = max((max(0, s[2] - base) for s in during), default=0)
    r['temp_peak'] = r['scratch_peak']
    r['samples'] = len(during)
    # The image as Glance has it, then deleted.
    im = s.get('%s/v2/images/%s' % (g, img), timeout=60).json()
    r['glance_status'], r['glance_size'] = im.get('status'), im.get('size')
    if s.delete('%s/v2/images/%s' % (g, img), timeout=120).status_code in (204, 404):
        r['deleted'] = True
    if r['glance_status'] != 'active' or r['glance_size'] != r.get('sent'):
        raise RuntimeError('image %s is %s, %s bytes (sent %s)' % (
            img, r['glance_status'], r['glance_size'], r.get('sent')))
    r['cpu_total_s'] = r['cpu_contender_s'] + (r['cpu_glance_s'] or 0)
    for k, v in list(r.items()):
        if isinstance(v, float):
            r[k] = round(v, 3)
    print(json.dumps(r), flush=True)


def agent_phases(logf, img, t_cast):
    lines = open(logf, errors='replace').read().splitlines()
    i0 = next(i for i, line in enumerate(lines) if 'snapshot to image %s starting' % img in line)
    r = {'cast_to_start_ms': log_ts(lines[i0]) - t_cast}
    for line in lines[i0:]:
        m = re.search(r'point in time taken via (\S+) in (\d+) ms .*freeze window (-?\d+) ms, '
                      r'(\d+) of (\d+) bytes allocated', line)
        if m and 'path' not in r:
            r.update(path=m.group(1), view_ms=int(m.group(2)), freeze_ms=max(0, int(m.group(3))),
                     allocated=int(m.group(4)), virtual=int(m.group(5)))
            r['pit_ms'] = log_ts(line) - t_cast
        m = re.search(r'image %s uploaded: (\S+), (\d+) bytes sent \((\d+) read of (\d+) virtual\) '
                      r'in (\d+) ms' % img, line)
        if m:
            r.update(format=m.group(1), sent=int(m.group(2)), read=int(m.group(3)),
                     upload_ms=int(m.group(5)))
        m = re.search(r'snapshot to image %s done in (\d+) ms' % img, line)
        if m:
            r['job_ms'] = int(m.group(1))
            r['t_done'] = log_ts(line)
            r['total_ms'] = r['t_done'] - t_cast
            break
    r['rest_ms'] = r['total_ms'] - r['pit_ms'] - r['upload_ms']
    r['convert_ms'] = 0
    return r


# --------------------------------------------------------------------------------------------
# roofline

def roofline(conf_path, gib, nbytes, reps):
    """Read bound: nbdcopy of the (shut-off) disk's chain, exported read-only by qemu-nbd, to
    null: (holes and zeros skipped, as the agent skips them). Upload bound: curl's chunked PUT of
    NBYTES zeros into a fresh Glance image. Each REPS times; medians."""
    c = json.load(open(conf_path))
    g, nbytes, reps = c['glance'], int(nbytes), int(reps)
    sock = os.path.join(c['bench'], 'roof.sock')
    reads, ups = [], []
    s = glance_session()
    for _ in range(reps):
        if os.path.exists(sock):
            os.unlink(sock)
        q = subprocess.Popen(['qemu-nbd', '-r', '-f', 'qcow2', '-k', sock, '-t', c['disk']],
                             stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            t0 = time.monotonic()
            subprocess.run(['nbdcopy', 'nbd+unix:///?socket=' + sock, 'null:'], check=True)
            reads.append((time.monotonic() - t0) * 1000)
        finally:
            q.terminate()
            q.wait()
        img = glance_create(s, g, 'compare-roofline', c['uuid'], c['virt_gib'])
        with open(c['images_file'], 'a') as f:
            f.write(img + '\n')
        try:
            t0 = time.monotonic()
            subprocess.run('head -c %d /dev/zero | curl -sSf -T - -X PUT -H "Content-Type: '
                           'application/octet-stream" %s/v2/images/%s/file'
                           % (nbytes, g, img), shell=True, check=True)
            ups.append((time.monotonic() - t0) * 1000)
        finally:
            s.delete('%s/v2/images/%s' % (g, img), timeout=120)
    print(json.dumps({'gib': int(gib), 'bytes': nbytes, 'read_ms': reads, 'upload_ms': ups,
                      'read_med_ms': statistics.median(reads),
                      'upload_med_ms': statistics.median(ups)}), flush=True)


# --------------------------------------------------------------------------------------------
# RPC

def rpc_latency(sent_file, *logs):
    sent = {}
    for line in open(sent_file):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if 'image_id' in d:
            sent[d['image_id']] = d['t_unix'] * 1000
    rx = re.compile(r'^(\S+ \S+) INFO worker: received snapshot_instance .* image (\S+) ')
    lat = []
    for logf in logs:
        for line in open(logf, errors='replace'):
            m = rx.match(line)
            if m and m.group(2) in sent:
                lat.append(log_ts(line) - sent[m.group(2)])
    lat.sort()
    n = len(lat)
    print(json.dumps({'n': n, 'sent': len(sent), 'p50': lat[n // 2] if n else None,
                      'p99': lat[min(n - 1, int(n * 0.99))] if n else None,
                      'max': lat[-1] if n else None}))


def received_span(t0_ms, sent_file, *logs):
    """How fast the agents took the casts listed in SENT_FILE: their number over (the last
    'received' line - T0), T0 in ms or 'first' (the first cast's publish time)."""
    sent = {}
    for line in open(sent_file):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if 'image_id' in d:
            sent[d['image_id']] = d['t_unix'] * 1000
    rx = re.compile(r'^(\S+ \S+) INFO worker: received snapshot_instance .* image (\S+) ')
    ts = []
    for logf in logs:
        for line in open(logf, errors='replace'):
            m = rx.match(line)
            if m and m.group(2) in sent:
                ts.append(log_ts(line))
    t0 = min(sent.values()) if t0_ms == 'first' else float(t0_ms)
    span = max(ts) - t0 if ts else None
    ts.sort()
    first = (len(ts) - 1) * 1000 / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0
    print(json.dumps({'sent': len(sent), 'received': len(ts), 'span_ms': span,
                      'rate': len(ts) * 1000 / span if span else 0, 'rate_first': first}))


# --------------------------------------------------------------------------------------------
# table and chart

def med_range(v, fmt='%.0f'):
    v = [x for x in v if x is not None]
    if not v:
        return '-'
    med, lo, hi = statistics.median(v), min(v), max(v)
    if len(v) == 1 or fmt % lo == fmt % hi:
        return fmt % med
    return (fmt + ' (' + fmt + '–' + fmt + ')') % (med, lo, hi)


def table(conf_path, out_md, out_png):
    c = json.load(open(conf_path))
    runs = [json.loads(l) for l in open(os.path.join(c['bench'], 'runs.jsonl'))]
    roof = {}
    for l in open(os.path.join(c['bench'], 'roofline.jsonl')):
        d = json.loads(l)
        roof[d['gib']] = d
    mem = [json.loads(l) for l in open(os.path.join(c['bench'], 'mem.jsonl'))]
    rpc = [json.loads(l) for l in open(os.path.join(c['bench'], 'rpc.jsonl'))]
    cases = []
    for mode in ('live', 'cold'):
        for gib in sorted({r['gib'] for r in runs}):
            a = [r for r in runs if r['mode'] == mode and r['gib'] == gib and r['contender'] == 'agent']
            b = [r for r in runs if r['mode'] == mode and r['gib'] == gib and r['contender'] == 'nova']
            if a and b:
                cases.append((mode, gib, a, b))
    out = []

    def pairs(a, b, key):
        nb = {r['pair']: r for r in b}
        return [r[key] / nb[r['pair']][key] for r in a
                if r['pair'] in nb and r.get(key) is not None and nb[r['pair']].get(key)]

    def bound(gib):
        d = roof.get(gib)
        return max(d['read_med_ms'], d['upload_med_ms']) if d else None

    out.append('## Summary: ours / nova\'s (median (min–max) over the runs; ratio = median of '
               'the pairwise ratios)\n')
    out.append('| case | pairs | our time, s | nova\'s time, s | time ratio | our temp MiB | '
               'nova\'s temp MiB | temp ratio | our freeze ms | nova\'s freeze ms | our CPU s | '
               'nova\'s CPU s | CPU ratio | roofline s | our fraction | nova\'s fraction |')
    out.append('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    chart_rows = []
    summary = {'bench': 'compare', 'cases': [], 'roofline': [], 'memory': mem, 'rpc': rpc}
    for mode, gib, a, b in cases:
        tb = bound(gib)
        fa = [tb / r['total_ms'] for r in a] if tb else []
        fb = [tb / r['total_ms'] for r in b] if tb else []
        tr = pairs(a, b, 'total_ms')
        cr = pairs(a, b, 'cpu_total_s')
        mr = [x['temp_peak'] / max(1, y['temp_peak']) for x, y in
              zip(sorted(a, key=lambda r: r['pair']), sorted(b, key=lambda r: r['pair']))]
        chart_rows.append(('%s %d GiB' % (mode, gib), tr, cr, mr, fa, fb))
        summary['cases'].append({
            'case': mode, 'gib': gib, 'pairs': min(len(a), len(b)),
            'time_s': {'ours': stats([r['total_ms'] / 1000 for r in a]),
                       'nova': stats([r['total_ms'] / 1000 for r in b])},
            'time_ratio': stats(tr),
            'temp_bytes': {'ours': stats([r['temp_peak'] for r in a]),
                           'nova': stats([r['temp_peak'] for r in b])},
            'temp_ratio': stats(mr),
            'freeze_ms': None if mode != 'live' else {
                'ours': stats([r.get('freeze_ms') for r in a]),
                'nova': stats([r.get('freeze_ms') for r in b])},
            'cpu_s': {'ours': stats([r['cpu_total_s'] for r in a]),
                      'nova': stats([r['cpu_total_s'] for r in b])},
            'cpu_ratio': stats(cr),
            'roofline_s': tb / 1000 if tb else None,
            'roofline_fraction': {'ours': stats(fa), 'nova': stats(fb)},
        })
        out.append('| %s, %d GiB written | %d | %s | %s | **%s** | %s | %s | %s | %s | %s | %s | '
                   '%s | %s | %s | %s | %s |' % (
                       mode, gib, min(len(a), len(b)),
                       med_range([r['total_ms'] / 1000 for r in a], '%.1f'),
                       med_range([r['total_ms'] / 1000 for r in b], '%.1f'),
                       '%.2f' % statistics.median(tr) if tr else '-',
                       med_range([r['temp_peak'] / MiB for r in a], '%.1f'),
                       med_range([r['temp_peak'] / MiB for r in b], '%.0f'),
                       '%.3f' % statistics.median(mr) if mr else '-',
                       med_range([r.get('freeze_ms') for r in a]) if mode == 'live' else '–',
                       med_range([r.get('freeze_ms') for r in b]) if mode == 'live' else '–',
                       med_range([r['cpu_total_s'] for r in a], '%.1f'),
                       med_range([r['cpu_total_s'] for r in b], '%.1f'),
                       '%.2f' % statistics.median(cr) if cr else '-',
                       '%.1f' % (tb / 1000) if tb else '-',
                       med_range(fa, '%.2f'), med_range(fb, '%.2f')))
    out.append('')
    out.append('Time: ours = cast → the agent\'s `done` line (includes RabbitMQ and the agent\'s '
               'intake, ~20 ms); nova\'s = the script\'s start → the upload answered, temp file '
               'removed (no RPC, no task-state updates). Temp = peak allocated bytes in the '
               'contender\'s snapshots_directory (100 ms samples). CPU = the contender '
               '(agent; or nova\'s script + its qemu-img runs) + glance-api. Roofline = the slower '
               'of reading the disk view (nbdcopy to null:) and uploading the same bytes to Glance '
               '(curl); fraction = roofline time / contender time (1.0 = at the bound).\n')

    # Per-case detail.
    rows = [
        ('runs (path)', lambda rs: '%d (%s)' % (len(rs), ', '.join(sorted({r['path'] for r in rs})))),
        ('cast → job start (agent), ms', lambda rs: med_range([r.get('cast_to_start_ms') for r in rs])),
        ('point in time ready (from the start), ms', lambda rs: med_range([r.get('pit_ms') for r in rs])),
        ('  nova: block copy until the mirror is ready, ms', lambda rs: med_range([r.get('mirror_ms') for r in rs])),
        ('  nova: freeze + abort + redefine + thaw, ms', lambda rs: med_range([r.get('abort_ms') for r in rs])),
        ('freeze window, ms', lambda rs: med_range([r.get('freeze_ms') for r in rs])),
        ('qemu-img convert to the temp file, ms', lambda rs: med_range([r.get('convert_ms') for r in rs])),
        ('upload (agent: read + encode + PUT + verify; nova: PATCH + PUT + GET), ms',
         lambda rs: med_range([r.get('upload_ms') for r in rs])),
        ('rest (image GET/PATCH, task states, view close / temp removal), ms',
         lambda rs: med_range([r.get('rest_ms') for r in rs])),
        ('**total, ms**', lambda rs: '**%s**' % med_range([r['total_ms'] for r in rs])),
        ('bytes sent to Glance, MiB', lambda rs: med_range([r['sent'] / MiB for r in rs], '%.1f')),
        ('peak temp bytes in snapshots_directory, MiB', lambda rs: med_range([r['scratch_peak'] / MiB for r in rs], '%.1f')),
        ('  nova: delta file, MiB', lambda rs: med_range([r.get('delta_bytes', 0) / MiB for r in rs if 'delta_bytes' in r], '%.0f')),
        ('peak /tmp + /var/tmp growth, whole machine (others\' jobs too), MiB',
         lambda rs: med_range([r['tmp_growth_peak'] / MiB for r in rs], '%.1f')),
        ('CPU s: agent / nova script + qemu-img', lambda rs: med_range([r['cpu_contender_s'] for r in rs], '%.1f')),
        ('CPU s: glance-api', lambda rs: med_range([r.get('cpu_glance_s') for r in rs], '%.1f')),
        ('CPU s: guest QEMU (incl. the guest\'s own TCG work)', lambda rs: med_range([r.get('cpu_qemu_s') for r in rs], '%.1f')),
        ('machine busy during the run, % of all cores', lambda rs: med_range([r.get('machine_busy_pct') for r in rs])),
        ('guest heartbeat gap, idle before the run, ms', lambda rs: med_range([r.get('hb_gap_idle_ms') for r in rs])),
        ('guest longest heartbeat gap during the snapshot, ms', lambda rs: med_range([r.get('hb_gap_ms') for r in rs])),
    ]
    for mode, gib, a, b in cases:
        out.append('### %s, %d GiB written\n' % (mode, gib))
        out.append('| measure | agent | nova |')
        out.append('|---|---:|---:|')
        for name, f in rows:
            if mode == 'cold' and ('heartbeat gap during' in name or 'freeze' in name or
                                   'QEMU' in name or 'nova: block' in name):
                continue
            out.append('| %s | %s | %s |' % (name, f(a), f(b)))
        out.append('')
    if roof:
        out.append('### Roofline (guest shut off)\n')
        out.append('| data | bytes, MiB | read: nbdcopy of qemu-nbd -r to null:, ms (MiB/s) | '
                   'upload: curl chunked PUT to Glance, ms (MiB/s) | bound, ms |')
        out.append('|---|---:|---:|---:|---:|')
        for gib, d in sorted(roof.items()):
            mb = d['bytes'] / MiB
            summary['roofline'].append({
                'gib': gib, 'bytes': d['bytes'], 'read_ms': stats(d['read_ms']),
                'upload_ms': stats(d['upload_ms']),
                'bound_ms': max(d['read_med_ms'], d['upload_med_ms'])})
            out.append('| %d GiB | %.0f | %s (%.0f) | %s (%.0f) | %.0f |' % (
                gib, mb, med_range(d['read_ms']), mb / (d['read_med_ms'] / 1000),
                med_range(d['upload_ms']), mb / (d['upload_med_ms'] / 1000),
                max(d['read_med_ms'], d['upload_med_ms'])))
        out.append('')
    if mem:
        out.append('### Agent memory\n')
        out.append('| phase | VmRSS idle, MiB | VmHWM at the end, MiB |')
        out.append('|---|---:|---:|')
        for m in mem:
            out.append('| %s | %.1f | %.1f |' % (m['phase'], m['idle_kb'] / 1024, m['hwm_kb'] / 1024))
        out.append('')
    if rpc:
        out.append('### RPC (test:///default, jobs fail at once)\n')
        out.append('| agents | cast → received p50 / p99 / max, ms (casts) | burst: casts/s taken '
                   '(senders in parallel) | backlog: casts/s drained from the start (from the first one taken) | RSS idle / VmHWM per agent, MiB |')
        out.append('|---:|---:|---:|---:|---:|')
        for d in rpc:
            out.append('| %d | %.1f / %.1f / %.1f (%d) | %.0f (%d casts) | %.0f (%.0f) (%d casts) | %s |' % (
                d['agents'], d['lat']['p50'], d['lat']['p99'], d['lat']['max'], d['lat']['n'],
                d['burst']['rate'], d['burst_n'], d['backlog']['rate'],
                d['backlog'].get('rate_first', 0), d['backlog_n'],
                ', '.join('%.1f / %.1f' % (i / 1024, h / 1024) for i, h in d['rss'])))
        out.append('')
    note = chart(chart_rows, out_png)
    if note:
        out.append(note + '\n')
    text = '\n'.join(out) + '\n'
    sys.stdout.write(text)
    with open(out_md, 'a') as f:
        f.write(text)
    # The same figures for bench/summarize.py, next to the markdown.
    with open(os.path.splitext(out_md)[0] + '.json', 'w') as f:
        json.dump(summary, f, indent=1)
        f.write('\n')


def stats(v):
    """{median, min, max, n} of the values that are not None; None if there are none."""
    v = [x for x in v if x is not None]
    if not v:
        return None
    return {'median': statistics.median(v), 'min': min(v), 'max': max(v), 'n': len(v)}


def chart(rows, out_png):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return '(no chart: python3-matplotlib is missing; deploy/install-packages.sh services)'
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r[0] for r in rows]
    x = range(len(rows))
    w = 0.27
    for k, (i, label) in enumerate(((1, 'time'), (2, 'CPU'), (3, 'temp bytes'))):
        med = [statistics.median(r[i]) if r[i] else 0 for r in rows]
        lo = [m - min(r[i]) if r[i] else 0 for m, r in zip(med, rows)]
        hi = [max(r[i]) - m if r[i] else 0 for m, r in zip(med, rows)]
        bars = ax1.bar([j + (k - 1) * w for j in x], med, w, yerr=[lo, hi], capsize=3,
                       label=label)
        ax1.bar_label(bars, fmt='%.2f', fontsize=8, padding=2)
    ax1.axhline(1.0, color='k', lw=0.8, ls='--')
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(names)
    ax1.set_ylabel("ours / nova's (median of pairs, min–max)")
    ax1.set_title("compute-agent vs nova's sequence")
    ax1.legend()
    for k, (i, label) in enumerate(((4, 'agent'), (5, 'nova'))):
        med = [statistics.median(r[i]) if r[i] else 0 for r in rows]
        bars = ax2.bar([j + (k - 0.5) * 0.38 for j in x], med, 0.38, label=label)
        ax2.bar_label(bars, fmt='%.2f', fontsize=8, padding=2)
    ax2.axhline(1.0, color='k', lw=0.8, ls='--')
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names)
    ax2.set_ylabel('roofline time / time (1 = at the bound)')
    ax2.set_title('fraction of the roofline')
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return '![ratios](%s)' % os.path.basename(out_png)


def run_or_delete(conf_path, *args):
    """run(), and if it fails, delete the images it made (the shell's trap does it again at
    the end, but Glance may be down then)."""
    c = json.load(open(conf_path))
    before = open(c['images_file']).read().split()
    try:
        run(conf_path, *args)
    except BaseException:
        s = glance_session()
        for img in open(c['images_file']).read().split():
            if img not in before:
                try:
                    s.delete('%s/v2/images/%s' % (c['glance'], img), timeout=60)
                except Exception:
                    pass
        raise


if __name__ == '__main__':
    cmd, args = sys.argv[1], sys.argv[2:]
    {'sample': sample, 'nova-live': nova_live, 'nova-cold': nova_cold, 'run': run_or_delete,
     'roofline': roofline, 'rpc-latency': rpc_latency, 'received-span': received_span,
     'table': table}[cmd](*args)
