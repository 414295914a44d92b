#!/usr/bin/python3
"""Test client speaking to compute-agent the way nova does, through python3-nova itself.

Run with Debian's /usr/bin/python3 (python3-nova 26.2.2, python3-oslo.messaging 14.0.3).

Subcommands (all take --config FILE, an oslo/nova config file with at least transport_url):

  cast    real snapshot_instance casts from nova.compute.rpcapi.ComputeAPI() to compute.HOST;
          one JSON line per cast, then a summary line with elapsed time and casts/s.
  call    an oslo RPCClient call of any method (topic compute, server HOST); prints the reply
          or the exception; exit 0 on any reply, 3 on timeout.
  listen  an oslo NotificationListener (threading executor); every notification as a JSON line
          in --out; versioned payloads are also rebuilt with nova's notification classes.
  decode  check one captured body file (oslo envelope) the way listen checks a notification.
  raw     publish a raw body (the byte-exact fixture, or a deliberately broken one) straight to
          the broker with py-amqp, bypassing oslo, to exercise the agent's input checks.

Output is JSON lines on stdout; diagnostics go to stderr. Exit status 1 on usage/setup errors.
"""

import argparse
import copy
import json
import logging
import os
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'nova', 'wire-rabbitmq',
                       'snapshot_instance_cast.json')

EXIT_OK, EXIT_FAIL, EXIT_TIMEOUT = 0, 1, 3


def emit(obj, stream=None):
    stream = stream or sys.stdout
    stream.write(json.dumps(obj, sort_keys=True, default=str) + '\n')
    stream.flush()


def finish(rc):
    """Flush and leave without waiting for oslo's/kombu's non-daemon helper threads."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# --------------------------------------------------------------------------------------------
# nova / oslo set-up


def nova_setup(config, version_cap=None, extra_exmods=(), init_rpc=True):
    """Parse the config file the way nova services do (nova.config.parse_args), then init rpc."""
    import nova.conf
    from nova import config as nova_config
    from nova import rpc

    conf = nova.conf.CONF
    nova_config.parse_args(['nova_client', '--config-file', config], configure_db=False,
                           init_rpc=False)
    # A short script must not linger ~10 s in oslo's metrics thread, whatever the file says.
    try:
        import oslo_messaging._metrics.client  # noqa: F401  registers the option group
        conf.set_override('metrics_thread_stop_timeout', 1, group='oslo_messaging_metrics')
    except Exception as e:  # pragma: no cover - older oslo without metrics
        logging.debug('metrics override: %s', e)
    if version_cap:
        conf.set_override('compute', version_cap, group='upgrade_levels')
    for mod in extra_exmods:
        rpc.add_extra_exmods(mod)
    if init_rpc:
        rpc.init(conf)
    return conf


def nova_cleanup():
    from nova import rpc
    try:
        rpc.cleanup()
    except Exception as e:
        logging.debug('rpc cleanup: %s', e)


def make_context(args=None):
    """A user's request context like the API's (the fixture's values; fresh request_id)."""
    from nova import context
    return context.RequestContext(
        user_id='fake', project_id='6f70656e737461636b20342065766572',
        user_name='demo', project_name='demo', roles=['reader', 'member'],
        user_domain_id='default', project_domain_id='default',
        is_admin=False, remote_address='127.0.0.1',
        auth_token='gAAAAABm-FAKE-KEYSTONE-TOKEN-ONLY-FOR-TESTS',
        service_catalog=[{'type': 'image', 'name': 'glance', 'endpoints': [{
            'region': 'RegionOne', 'publicURL': 'http://127.0.0.1:9292',
            'internalURL': 'http://127.0.0.1:9292', 'adminURL': 'http://127.0.0.1:9292'}]}])


def fixture_cast():
    """The captured cast: (raw body bytes, outer dict, inner message dict)."""
    with open(FIXTURE, 'rb') as f:
        raw = f.read()
    outer = json.loads(raw)
    return raw, outer, json.loads(outer['oslo.message'])


def build_instance(host, instance_uuid=None, display_name=None, vm_state=None,
                   task_state='keep', sysmeta=None, power_state=None):
    """A real nova Instance object, rebuilt from the captured cast's instance primitive."""
    from nova import objects
    objects.register_all()
    _, _, inner = fixture_cast()
    prim = copy.deepcopy(inner['args']['instance'])
    inst = objects.Instance.obj_from_primitive(prim)
    inst.uuid = instance_uuid or str(uuid.uuid4())
    inst.host = host
    inst.node = host
    inst.launched_on = host
    if 'info_cache' in inst and inst.info_cache is not None:
        inst.info_cache.instance_uuid = inst.uuid
    if display_name is not None:
        inst.display_name = display_name
    if vm_state is not None:
        inst.vm_state = vm_state
    if task_state != 'keep':
        inst.task_state = task_state
    if power_state is not None:
        inst.power_state = power_state
    for kv in sysmeta or []:
        k, _, v = kv.partition('=')
        md = dict(inst.system_metadata)
        md[k] = v
        inst.system_metadata = md
    # What the API hands to rpcapi was loaded from the DB: nothing pending.
    inst.obj_reset_changes(recursive=True)
    return inst


def transport_params(conf):
    """(host, port, user, password, vhost) of the first broker in [DEFAULT] transport_url."""
    import oslo_messaging as messaging
    url = messaging.TransportURL.parse(conf)
    h = url.hosts[0]
    vhost = url.virtual_host if url.virtual_host else '/'
    return h.hostname, h.port or 5672, h.username, h.password, vhost


def amqp_connect(conf):
    import amqp
    host, port, user, password, vhost = transport_params(conf)
    conn = amqp.Connection(host='%s:%s' % (host, port), userid=user, password=password,
                           virtual_host=vhost, connect_timeout=10,
                           client_properties={'connection_name': 'nova_client.py:%d' % os.getpid()})
    conn.connect()
    return conn


# --------------------------------------------------------------------------------------------
# cast


def cmd_cast(args):
    nova_setup(args.config, version_cap=args.version_cap)
    from nova.compute import rpcapi as compute_rpcapi

    task_state = args.task_state
    if task_state in ('None', 'none', ''):
        task_state = None
    inst = build_instance(args.host, args.instance_uuid, args.display_name, args.vm_state,
                          task_state, args.sysmeta, args.power_state)
    api = compute_rpcapi.ComputeAPI()
    probe = make_context()
    client = api.router.client(probe)
    rpc_version = '6.0' if client.can_send_version('6.0') else '5.0'

    results = []
    t_start_unix = time.time()
    t0 = time.monotonic()
    for i in range(args.count):
        if args.distinct_instances and i > 0:
            inst.uuid = str(uuid.uuid4())
            if 'info_cache' in inst and inst.info_cache is not None:
                inst.info_cache.instance_uuid = inst.uuid
            inst.obj_reset_changes(recursive=True)
        ctxt = make_context()
        image_id = args.image_id or str(uuid.uuid4())
        if args.interval_ms and i > 0:
            time.sleep(args.interval_ms / 1000.0)
        t_unix = time.time()
        api.snapshot_instance(ctxt, inst, image_id)
        results.append({'image_id': image_id, 'instance_uuid': inst.uuid,
                        'request_id': ctxt.request_id, 't_unix': round(t_unix, 6)})
    elapsed = time.monotonic() - t0
    if not args.quiet:
        for r in results:
            emit(r)
    emit({'summary': 'cast', 'count': args.count, 'host': args.host, 'topic': 'compute.%s' % args.host,
          'rpc_version': rpc_version, 'version_cap': args.version_cap,
          't_start_unix': round(t_start_unix, 6), 'elapsed_s': round(elapsed, 6),
          'casts_per_s': round(args.count / elapsed, 1) if elapsed > 0 else None})
    nova_cleanup()
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# call


def describe_exception(e):
    import oslo_messaging as messaging
    cls = type(e)
    d = {'exception': cls.__name__, 'exception_module': cls.__module__}
    if isinstance(e, messaging.RemoteError):
        # The remote class was not importable/allowed here: nova's default view of oslo errors.
        d['remote_class'] = e.exc_type
        d['message'] = e.value
        d['remote_traceback'] = e.traceback
    else:
        name = cls.__name__
        if name.endswith('_Remote'):
            name = name[:-len('_Remote')]
        d['remote_class'] = name
        d['message'] = str(e).split('\n', 1)[0]
        d['args'] = list(getattr(e, 'args', ()))
    return d


def cmd_call(args):
    nova_setup(args.config, extra_exmods=args.allow_exmod)
    import oslo_messaging as messaging
    from nova.objects import base as objects_base
    from nova import rpc

    kwargs = json.loads(args.args) if args.args else {}
    if args.snapshot_args:
        kwargs.setdefault('instance', build_instance(args.host))
        kwargs.setdefault('image_id', str(uuid.uuid4()))
    target = messaging.Target(topic=args.topic, server=args.host, version=args.version,
                              namespace=args.namespace)
    client = rpc.get_client(target, serializer=objects_base.NovaObjectSerializer())
    cctxt = client.prepare(timeout=args.timeout, version=args.version)
    ctxt = make_context()
    out = {'method': args.method, 'version': args.version, 'host': args.host,
           'request_id': ctxt.request_id}
    t0 = time.monotonic()
    rc = EXIT_OK
    try:
        res = cctxt.call(ctxt, args.method, **kwargs)
        out.update({'reply': 'result', 'result': res})
    except messaging.MessagingTimeout as e:
        out.update({'reply': 'timeout', 'exception': type(e).__name__, 'message': str(e)})
        rc = EXIT_TIMEOUT
    except Exception as e:  # every other exception here came back as a failure reply
        out['reply'] = 'error'
        out.update(describe_exception(e))
    out['elapsed_s'] = round(time.monotonic() - t0, 3)
    emit(out)
    nova_cleanup()
    return rc


# --------------------------------------------------------------------------------------------
# versioned notification checks (listen, decode)

_registry_ready = False


def _notification_registry():
    global _registry_ready
    if not _registry_ready:
        import importlib
        import pkgutil
        from nova import objects
        from nova.objects import base as objects_base
        import nova.notifications.objects as notif_pkg
        objects.register_all()
        for m in pkgutil.iter_modules(notif_pkg.__path__):
            importlib.import_module('nova.notifications.objects.' + m.name)
        from nova.notifications.objects import base as notif_base
        # nova registers notification classes only for tests/doc generation; do what they do.
        objects_base.NovaObjectRegistry.register_notification_objects()
        # ovo rebuilds an object with cls() and then sets each field from the primitive, but
        # nova's payload classes take constructor arguments (context, instance, ...) because
        # nova only ever builds them from live objects. For deserialization give every
        # notification class the argument-less constructor of its base; field values are still
        # set and type-checked by nova's own field definitions.
        def plain_init(base):
            def __init__(self):
                base.__init__(self)
            return __init__
        for cls in objects_base.NovaObjectRegistry.notification_classes:
            if issubclass(cls, notif_base.NotificationPayloadBase):
                cls.__init__ = plain_init(notif_base.NotificationPayloadBase)
            else:
                cls.__init__ = plain_init(notif_base.NotificationObject)
        _registry_ready = True


def _field_report(prim, path, unknown, unset):
    """Walk a primitive: keys nova's class does not have (unknown) or has but was not sent."""
    from nova.objects import base as objects_base
    if isinstance(prim, dict) and 'nova_object.name' in prim:
        try:
            cls = objects_base.NovaObject.obj_class_from_name(prim['nova_object.name'],
                                                               prim['nova_object.version'])
        except Exception as e:
            unknown.append('%s: %s' % (path or '.', e))
            return
        data = prim.get('nova_object.data', {})
        for k in sorted(set(data) - set(cls.fields)):
            unknown.append('%s.%s' % (path, k))
        for k in sorted(set(cls.fields) - set(data)):
            unset.append('%s.%s' % (path, k))
        for k, v in data.items():
            _field_report(v, '%s.%s' % (path, k), unknown, unset)
    elif isinstance(prim, list):
        for i, v in enumerate(prim):
            _field_report(v, '%s[%d]' % (path, i), unknown, unset)


def _diff(a, b, path, out, limit=20):
    if len(out) >= limit:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a:
                out.append('%s.%s: missing in sent payload' % (path, k))
            elif k not in b:
                out.append('%s.%s: dropped by nova' % (path, k))
            else:
                _diff(a[k], b[k], '%s.%s' % (path, k), out, limit)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, '%s[%d]' % (path, i), out, limit)
    elif path.endswith('.auto_disk_config') and a in ('MANUAL', 'AUTO') and b == 'AUTO':
        # nova's DiskConfig.coerce maps any truthy value, the string 'MANUAL' included, to
        # 'AUTO': reading the field back is lossy in nova itself, not a wire difference.
        return
    elif a != b or type(a) is not type(b):
        out.append('%s: sent %r, nova re-serialises %r' % (path, a, b))


def check_versioned(payload):
    """Rebuild a versioned payload with nova's own classes; report what nova would see."""
    _notification_registry()
    from nova.objects import base as objects_base
    res = {'deserialized': False}
    try:
        obj = objects_base.NovaObject.obj_from_primitive(copy.deepcopy(payload))
    except Exception as e:
        res['error'] = '%s: %s' % (type(e).__name__, e)
        return res
    res.update({'deserialized': True, 'class': type(obj).__name__, 'version': obj.VERSION,
                'sent_version': payload.get('nova_object.version')})
    unknown, unset = [], []
    _field_report(payload, '', unknown, unset)
    res['unknown_fields'] = unknown
    res['unset_fields'] = unset
    try:
        again = obj.obj_to_primitive(target_version=payload.get('nova_object.version'))
        diffs = []
        _diff(payload, json.loads(json.dumps(again, default=str)), '', diffs)
        res['roundtrip_equal'] = not diffs
        if diffs:
            res['roundtrip_diffs'] = diffs
    except Exception as e:
        res['roundtrip_equal'] = False
        res['roundtrip_error'] = '%s: %s' % (type(e).__name__, e)
    return res


def is_versioned(payload):
    return isinstance(payload, dict) and 'nova_object.name' in payload


def cmd_decode(args):
    with open(args.file, 'rb') as f:
        raw = f.read()
    outer = json.loads(raw)
    msg = json.loads(outer['oslo.message']) if 'oslo.message' in outer else outer
    payload = msg.get('payload')
    out = {'file': args.file, 'event_type': msg.get('event_type'),
           'publisher_id': msg.get('publisher_id')}
    if is_versioned(payload):
        out['versioned'] = check_versioned(payload)
    emit(out)
    return EXIT_OK if not is_versioned(payload) or out['versioned']['deserialized'] else EXIT_FAIL


# --------------------------------------------------------------------------------------------
# listen


class Collector(object):
    """Endpoint for every oslo priority; appends one JSON line per notification."""

    def __init__(self, out, want, check):
        self.out = out
        self.want = want
        self.check = check
        self.n = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def _record(self, priority, ctxt, publisher_id, event_type, payload, metadata):
        rec = {'priority': priority, 'ctxt': ctxt, 'publisher_id': publisher_id,
               'event_type': event_type, 'payload': payload, 'metadata': metadata,
               'received_unix': round(time.time(), 6)}
        if self.check and is_versioned(payload):
            try:
                rec['versioned'] = check_versioned(payload)
            except Exception as e:  # a checker bug must not lose the notification
                rec['versioned'] = {'deserialized': False,
                                    'error': 'checker: %s: %s' % (type(e).__name__, e)}
        line = json.dumps(rec, sort_keys=True, default=str) + '\n'
        with self.lock:
            if self.done.is_set() and self.want:
                return None
            self.out.write(line)
            self.out.flush()
            self.n += 1
            if self.want and self.n >= self.want:
                self.done.set()
        return None  # oslo: None/HANDLED acks the message

    def _mk(priority):
        def handler(self, ctxt, publisher_id, event_type, payload, metadata):
            return self._record(priority, ctxt, publisher_id, event_type, payload, metadata)
        handler.__name__ = priority
        return handler

    audit = _mk('audit')
    debug = _mk('debug')
    info = _mk('info')
    warn = _mk('warn')
    error = _mk('error')
    critical = _mk('critical')
    sample = _mk('sample')
    del _mk


def cmd_listen(args):
    conf = nova_setup(args.config, init_rpc=False)
    import oslo_messaging as messaging

    priorities = [p.strip() for p in args.priorities.split(',') if p.strip()]

    # Only the wanted priorities get a handler method: oslo declares a queue (or binding) per
    # topic.priority for each method the endpoint has.
    class Endpoint(object):
        pass

    out = open(args.out, 'a')
    collector = Collector(out, args.count, not args.no_check)
    endpoint = Endpoint()
    for p in priorities:
        setattr(endpoint, p, getattr(collector, p))

    transport = messaging.get_notification_transport(conf)
    targets = [messaging.Target(topic=t.strip()) for t in args.topics.split(',') if t.strip()]
    listener = messaging.get_notification_listener(transport, targets, [endpoint],
                                                   executor='threading', pool=args.pool)
    listener.start()
    emit({'event': 'ready', 'topics': args.topics, 'pool': args.pool, 'priorities': priorities})
    if args.ready_file:
        with open(args.ready_file, 'w') as f:
            f.write('ready\n')
    got = collector.done.wait(args.timeout) if args.count else (time.sleep(args.timeout) or True)
    listener.stop()
    listener.wait()
    out.close()
    if args.pool and not args.keep_queue:
        # A pool queue outlives the listener and would collect every notification from now on.
        try:
            conn = amqp_connect(conf)
            ch = conn.channel()
            ch.queue_delete(args.pool)
            conn.close()
        except Exception as e:
            logging.warning('could not delete pool queue %s: %s', args.pool, e)
    transport.cleanup()
    emit({'summary': 'listen', 'received': collector.n, 'wanted': args.count,
          'complete': bool(got) and (collector.n >= args.count)})
    return EXIT_OK if collector.n >= args.count else EXIT_FAIL


# --------------------------------------------------------------------------------------------
# raw


def raw_body(kind, host):
    """Bodies for the agent's input checks. 'fixture' is the byte-exact capture, with only the
    instance's host replaced when --set-host is given."""
    raw, outer, inner = fixture_cast()
    meta = {'image_id': inner['args']['image_id'], 'unique_id': inner['_unique_id']}
    if kind == 'fixture':
        if host:
            old = b'\\"host\\": \\"compute-1\\"'
            if raw.count(old) != 1:
                raise SystemExit('fixture: instance host field not found exactly once')
            raw = raw.replace(old, ('\\"host\\": \\"%s\\"' % host).encode())
        return raw, meta
    inner = copy.deepcopy(inner)
    inner['_unique_id'] = uuid.uuid4().hex
    inner['args']['image_id'] = str(uuid.uuid4())
    meta = {'image_id': inner['args']['image_id'], 'unique_id': inner['_unique_id']}
    if host:
        inner['args']['instance']['nova_object.data']['host'] = host
    if kind == 'invalid-json':
        return raw[:len(raw) // 2], {}
    if kind == 'envelope-3.0':
        return json.dumps({'oslo.version': '3.0', 'oslo.message': json.dumps(inner)}).encode(), meta
    if kind == 'huge':
        # Well-formed in every other respect: only the size is wrong (5 MiB).
        inner['_padding'] = 'x' * (5 * 1024 * 1024)
        return json.dumps({'oslo.version': '2.0', 'oslo.message': json.dumps(inner)}).encode(), meta
    if kind == 'valid':
        return json.dumps({'oslo.version': '2.0', 'oslo.message': json.dumps(inner)}).encode(), meta
    raise SystemExit('unknown body kind %s' % kind)


def cmd_raw(args):
    import amqp
    conf = nova_setup(args.config, init_rpc=False)
    meta = {}
    if args.body_file:
        with open(args.body_file, 'rb') as f:
            body = f.read()
    else:
        body, meta = raw_body(args.kind, args.set_host)
    routing_key = args.routing_key or 'compute.%s' % args.host
    conn = amqp_connect(conf)
    ch = conn.channel()
    returned = []
    ch.events['basic_return'].add(lambda exc, exch, rk, msg: returned.append(str(exc)))
    props = {'content_encoding': 'utf-8', 'delivery_mode': 2, 'priority': 0,
             'application_headers': {}}
    if args.content_type:
        props['content_type'] = args.content_type
    for _ in range(args.count):
        msg = amqp.Message(body, **props)
        # Confirmed and mandatory: an unroutable publish (no queue bound yet) is reported.
        ch.basic_publish_confirm(msg, exchange=args.exchange, routing_key=routing_key,
                                 mandatory=True, confirm_timeout=10)
    ch.close()
    conn.close()
    emit(dict(meta, **{'summary': 'raw', 'kind': 'file' if args.body_file else args.kind,
          'bytes': len(body), 'count': args.count, 'exchange': args.exchange,
          'routing_key': routing_key, 'content_type': args.content_type,
          'returned': returned}))
    return EXIT_FAIL if returned else EXIT_OK


# --------------------------------------------------------------------------------------------


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--debug', action='store_true', help='debug logging to stderr')
    sub = p.add_subparsers(dest='cmd', required=True)

    c = sub.add_parser('cast', help='snapshot_instance casts via nova ComputeAPI')
    c.add_argument('--config', required=True)
    c.add_argument('--host', required=True, help='instance.host: the cast goes to compute.HOST')
    c.add_argument('--count', type=int, default=1)
    c.add_argument('--version-cap', help='[upgrade_levels] compute, e.g. 5.0')
    c.add_argument('--instance-uuid')
    c.add_argument('--distinct-instances', action='store_true',
                   help='a fresh instance uuid for every cast (default: one instance for all)')
    c.add_argument('--image-id', help='the same image id for every cast (default: uuid4 each)')
    c.add_argument('--display-name')
    c.add_argument('--vm-state')
    c.add_argument('--power-state', type=int, help='nova power_state (1 running, 4 shutdown)')
    c.add_argument('--sysmeta', action='append', default=[],
                   help='system_metadata KEY=VALUE (e.g. image_os_require_quiesce=yes); repeatable')
    c.add_argument('--task-state', default='keep',
                   help="default: the fixture's image_snapshot_pending; None for None")
    c.add_argument('--quiet', action='store_true', help='only the summary line')
    c.add_argument('--interval-ms', type=float, default=0,
                   help='pause between casts (latency measurements); each line has t_unix')

    c = sub.add_parser('call', help='an oslo RPC call to compute.HOST')
    c.add_argument('--config', required=True)
    c.add_argument('--host', required=True)
    c.add_argument('--method', required=True)
    c.add_argument('--version', default='6.0')
    c.add_argument('--namespace')
    c.add_argument('--topic', default='compute')
    c.add_argument('--timeout', type=float, default=10)
    c.add_argument('--args', help='JSON object of keyword arguments')
    c.add_argument('--snapshot-args', action='store_true',
                   help='send instance= (an Instance object) and image_id= like snapshot_instance')
    c.add_argument('--allow-exmod', action='append', default=[],
                   help='also rebuild exceptions from this module (nova allows only '
                        'nova.exception); e.g. oslo_messaging.rpc.dispatcher')

    c = sub.add_parser('listen', help='collect notifications with an oslo NotificationListener')
    c.add_argument('--config', required=True)
    c.add_argument('--topics', default='notifications,versioned_notifications')
    c.add_argument('--priorities', default='info,warn,error',
                   help='oslo priorities to subscribe (one queue or binding each); nova sends '
                        'info, warn and error; all: audit,debug,info,warn,error,critical,sample')
    c.add_argument('--pool', help='listener pool = queue name (default: shared topic.priority '
                                  'queues, as nova-less consumers like ceilometer without pool)')
    c.add_argument('--keep-queue', action='store_true', help='do not delete the pool queue')
    c.add_argument('--count', type=int, default=1)
    c.add_argument('--timeout', type=float, default=30)
    c.add_argument('--out', required=True, help='JSON lines, appended')
    c.add_argument('--ready-file', help='written once the listener is subscribed')
    c.add_argument('--no-check', action='store_true', help='skip versioned deserialization')

    c = sub.add_parser('decode', help='check one captured notification body file')
    c.add_argument('file')

    c = sub.add_parser('raw', help='publish a raw body with py-amqp (no oslo)')
    c.add_argument('--config', required=True)
    c.add_argument('--host', help='routing key compute.HOST')
    c.add_argument('--routing-key')
    c.add_argument('--exchange', default='nova')
    c.add_argument('--kind', default='fixture',
                   choices=['fixture', 'valid', 'invalid-json', 'envelope-3.0', 'huge'])
    c.add_argument('--body-file')
    c.add_argument('--set-host', help="replace the fixture instance's host (only that field)")
    c.add_argument('--content-type', default='application/json',
                   help="'' to send none")
    c.add_argument('--count', type=int, default=1, help='publish the same bytes N times')

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')
    if not args.debug:
        # nova.rpc.get_client builds RPCClient itself; oslo 14 warns about that on every use.
        logging.getLogger('oslo_messaging.rpc.client').setLevel(logging.ERROR)
    if args.cmd == 'raw' and not (args.routing_key or args.host):
        p.error('raw needs --host or --routing-key')
    return {'cast': cmd_cast, 'call': cmd_call, 'listen': cmd_listen, 'decode': cmd_decode,
            'raw': cmd_raw}[args.cmd](args)


if __name__ == '__main__':
    try:
        rc = main(sys.argv[1:])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (emit({'error': str(e.code)}, sys.stderr) or 1)
    except Exception as e:
        logging.exception('nova_client failed')
        emit({'error': '%s: %s' % (type(e).__name__, e)}, sys.stderr)
        rc = EXIT_FAIL
    finish(rc)
