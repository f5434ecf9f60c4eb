"""Assemble and run the service: journal, core, executor, gRPC server, health, reflection, metrics.

``PlannerServer(ServeConfig(...)).start()`` is what ``ditplan serve`` runs and
what the tests start on a loopback port (``port=0`` picks a free one).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ditplan.models.cost import CostModel
from ditplan.models.profiles import builtin_profiles, load_profile
from ditplan.models.refine import RefineConfig
from ditplan.planner.cluster import parse_cluster
from ditplan.planner.policies.base import make_policy, policy_names
from ditplan.planner.service.auth import TokenAuthInterceptor
from ditplan.planner.service.clock import SimClock, WallClock
from ditplan.planner.service.core import CoreConfig, PlannerCore
from ditplan.planner.service.gen import planner_pb2 as pb
from ditplan.planner.service.gen import planner_pb2_grpc as pb_grpc
from ditplan.planner.service.journal import Journal, JournalLockedError  # noqa: F401  (JournalLockedError: re-exported)
from ditplan.planner.service.limits import Limits, LimitsInterceptor
from ditplan.planner.service.servicer import PlannerServicer
from ditplan.planner.service.sim_executor import SimulatedExecutor

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Planner"].full_name  # "ditplan.v1.Planner"
TOKEN_ENV = "DITPLAN_TOKEN"
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def default_policy() -> str:
    """``cpsat`` where registered, else ``tetriserve-dp``."""
    return "cpsat" if "cpsat" in policy_names() else "tetriserve-dp"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("ditplan")
    except Exception:  # running from a checkout that is not installed
        return "dev"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    cluster: str = "8xH100"
    policy: str | None = None  # None: default_policy()
    simulate: bool = False
    speed: float = 1.0  # --simulate: service-clock seconds per wall second
    noise: float = 0.0  # --simulate: lognormal step-time noise
    seed: int = 0
    state_dir: str = "ditplan-state"
    journal_sync: str = "full"
    slo_scale: float = 1.5
    round_s: float = 2.0
    max_queue: int = 10_000
    heartbeat_timeout_s: float = 10.0
    min_plan_gap_s: float = 0.005  # wall seconds between plans at least (coalesces bursts)
    plan_window: int = 512  # not-yet-started requests a plan sees at most (earliest deadlines); 0: all
    planner_process: bool = False  # solve in a child process (the CLI's default), off the RPC threads' GIL
    metrics_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    max_workers: int = 64
    grace_s: float = 2.0
    late: str = "serve"  # solver policies: serve late requests in spare capacity, or reject them
    wall_limit_s: float | None = 0.5  # solver policies: wall-clock cap of one solve (real time rules here)
    reject_grace_s: float = 1.0  # --late reject: reject only requests that would miss by more (planning latency)
    models: tuple[str, ...] = ()  # served models, placed per GPU; (): every model requests name, everywhere
    placement: str = "auto"  # with models: auto | replicate | split | MODEL:GPUS,...
    profiles: tuple[str, ...] = ()  # measured profile files (ditplan profile) on top of the built-in ones
    refine: bool = True  # refine step times from executors' reports (models/refine.py)
    metrics_host: str = "127.0.0.1"  # /metrics has no authentication: loopback unless told otherwise
    allow_insecure: bool = False  # serve a --host beyond loopback without a token (a warning, not a refusal)
    # Concurrency budgets and stream deadlines (planner/service/limits.py):
    health_reserve: int = 4  # worker threads only health checks may use
    unary_reserve: int = 8  # worker threads streams may not use
    max_plan_streams: int = 16  # concurrent StreamPlans
    max_report_streams: int = 32  # concurrent ReportProgress
    max_other_streams: int = 4  # concurrent other streams (server reflection)
    handshake_s: float = 5.0  # a stream's first message must arrive within this
    stream_idle_s: float = 30.0  # a client stream's next message must arrive within this

    def limits(self) -> Limits:
        return Limits(max_workers=self.max_workers, health_reserve=self.health_reserve,
                      unary_reserve=self.unary_reserve, max_plan_streams=self.max_plan_streams,
                      max_report_streams=self.max_report_streams, max_other_streams=self.max_other_streams,
                      handshake_s=self.handshake_s, stream_idle_s=self.stream_idle_s)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only loopback addresses (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress
    h = host.strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_exposure(cfg: "ServeConfig") -> None:
    """Refuse a --host beyond loopback without a token unless ``allow_insecure`` (then warn)."""
    if cfg.token or is_loopback(cfg.host):
        return
    if not cfg.allow_insecure:
        raise ValueError(f"refusing to serve --host {cfg.host} (beyond loopback) without a token: anyone who can "
                         "reach it could submit, cancel and read requests; set DITPLAN_TOKEN or --token-file, "
                         "or pass --allow-insecure")
    log.warning("serving --host %s without a token (--allow-insecure): every client that reaches it is trusted",
                cfg.host)


class PortInUseError(OSError):
    """The gRPC (or metrics) port is taken: another server listens there."""


def _in_use(host: str, port: int) -> bool:
    """Whether a listener holds ``host:port`` (probed like gRPC binds: SO_REUSEADDR, no SO_REUSEPORT).

    Probing first keeps gRPC's own multi-line bind error off the terminal in the common case."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return False  # gRPC reports what it makes of the host
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
    return False


def _bind(server: grpc.Server, host: str, port: int, creds) -> int:
    """Bind ``server`` to ``host:port``; the bound port. :class:`PortInUseError` when it is taken."""
    target = f"{host}:{port}"
    in_use = PortInUseError(f"port {target} is in use (another ditplan serve?); pick another --port or stop it")
    if _in_use(host, port):
        raise in_use
    try:
        bound = server.add_secure_port(target, creds) if creds is not None else server.add_insecure_port(target)
    except RuntimeError:  # grpcio >= 1.5x raises where it used to return 0
        bound = 0
    if not bound:
        if _in_use(host, port):  # taken since the probe
            raise in_use
        raise OSError(f"cannot bind {target}: check --host (an address of this machine) and --port "
                      "(below 1024 needs privileges)")
    return bound


class PlannerServer:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.port: int | None = None
        self.limits: LimitsInterceptor | None = None  # its .limiter counts calls in flight per kind
        self.metrics_port: int | None = None
        self.core: PlannerCore | None = None
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._sim: SimulatedExecutor | None = None
        self._metrics_http = None
        self._journal: Journal | None = None
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> "PlannerServer":
        """Lock and open the journal, bind the port, start planning and serving.

        Fails before anything is left running: :class:`JournalLockedError` when another server holds
        ``state_dir``, :class:`PortInUseError` when the port (or the metrics port) is taken."""
        cfg = self.config
        policy = cfg.policy or default_policy()
        make_policy(policy)  # fail fast on an unknown name
        if not cfg.speed > 0:
            raise ValueError(f"--speed must be > 0, got {cfg.speed}")
        cluster = parse_cluster(cfg.cluster)
        cost = CostModel(cluster.kind, builtin_profiles() + [load_profile(p) for p in cfg.profiles])
        cfg.limits().validate()
        check_exposure(cfg)
        creds = None
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        try:
            self._start(policy, cluster, cost, creds)
            self._watch_journal(True)
        except BaseException:
            self.stop(grace=0)  # close what was opened: the journal (and its lock), threads, the port
            self._grpc = None
            raise
        return self

    def _start(self, policy: str, cluster, cost: CostModel, creds) -> None:
        cfg = self.config
        clock_box: dict = {}

        def meta() -> dict[str, str]:  # persisted with every commit: the virtual clock resumes from it
            return {"clock": repr(clock_box["clock"].now())}

        target = f"{cfg.host}:{cfg.port}"
        # The state directory first: a second server on it learns who holds it, whatever its port.
        self._journal, recovered = Journal.open(cfg.state_dir, cfg.journal_sync,
                                                meta_source=meta if cfg.simulate else None,
                                                owner={"address": target})
        self.limits = LimitsInterceptor(cfg.limits())  # first: it sees every call, refusals by the others too
        interceptors = [self.limits]
        token = cfg.token
        if token:
            interceptors.append(TokenAuthInterceptor(token))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="ditplan-rpc"),
                             interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0),
                                      # Keepalive: a peer that vanished without closing its connection
                                      # (power loss, a cut cable) is found within about 40 s and its
                                      # streams end, freeing their budget.
                                      ("grpc.keepalive_time_ms", 30_000),
                                      ("grpc.keepalive_timeout_ms", 10_000),
                                      ("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 10_000)])
        self._grpc = server
        self.port = _bind(server, cfg.host, cfg.port, creds)
        if self._journal.lock is not None:
            self._journal.lock.update(address=self.address)

        if cfg.simulate:
            clock = SimClock(float(recovered.meta.get("clock", "0")), cfg.speed)
        else:
            clock = WallClock()
        clock_box["clock"] = clock
        core_cfg = CoreConfig(cluster=cluster, cost=cost, policy=policy, slo_scale=cfg.slo_scale,
                              round_s=cfg.round_s, max_queue=cfg.max_queue,
                              heartbeat_timeout_s=cfg.heartbeat_timeout_s, min_plan_gap_s=cfg.min_plan_gap_s,
                              plan_window=cfg.plan_window, planner_process=cfg.planner_process,
                              policy_options={"late": cfg.late, "wall_limit_s": cfg.wall_limit_s,
                                              "reject_grace_s": cfg.reject_grace_s},
                              cluster_spec=cfg.cluster, version=_version(), models=tuple(cfg.models),
                              placement=cfg.placement, refine=RefineConfig() if cfg.refine else None)
        self.core = PlannerCore(core_cfg, self._journal, recovered, clock)
        self.core.start()
        if cfg.simulate:
            self._sim = SimulatedExecutor(self.core, clock, noise=cfg.noise, seed=cfg.seed)
            self._sim.start()

        pb_grpc.add_PlannerServicer_to_server(PlannerServicer(self.core, policy, cfg.cluster), server)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            from ditplan.planner.service.metrics import start_metrics_server
            try:
                self._metrics_http, self.metrics_port = start_metrics_server(self.core, cfg.metrics_port,
                                                                                 cfg.metrics_host)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(f"metrics port {cfg.metrics_host}:{cfg.metrics_port} is in use; pick another "
                                         "--metrics-port or stop what holds it") from None
                raise OSError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {exc}") from None
        log.info("ditplan serving on %s (cluster %s, policy %s%s)", self.address, cluster.name, policy,
                 f", simulated x{cfg.speed:g}" if cfg.simulate else "")

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish in-flight ones (``grace`` seconds), flush the journal."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._watch_journal(False)
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self.core is not None:
            self.core.stop()  # closes executor sessions, so plan streams end
        if self._grpc is not None:
            self._grpc.stop(self.config.grace_s if grace is None else grace).wait()
        if self._sim is not None:
            self._sim.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self._journal is not None:
            self._journal.close()

    def _watch_journal(self, on: bool) -> None:
        """Health follows the journal: NOT_SERVING (overall and for the Planner service) while it cannot
        write (a full or read-only disk), SERVING once it can again. ``on=False`` (stop) unsubscribes."""
        unsubscribe = self.__dict__.pop("_journal_watch", None)
        if unsubscribe is not None:
            unsubscribe()
        if not on or self._journal is None or self._health is None:
            return
        servicer = self._health

        def on_writable(ok: bool) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                servicer.set(name, status)  # ignored once stop() began the graceful shutdown

        self._journal_watch = self._journal.subscribe(on_writable)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "PlannerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def serve(config: ServeConfig, announce=print) -> None:
    """Run until SIGINT or SIGTERM; ``announce`` gets the listening line (with the bound port)."""
    server = PlannerServer(config).start()
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    mode = f"simulated executor x{config.speed:g}" if config.simulate else "waiting for executors"
    metrics = f", metrics on http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    tls = " (TLS)" if config.tls_cert else ""
    announce(f"ditplan serve: listening on {server.address}{tls}; cluster {config.cluster}, "
             f"policy {server.core.config.policy}, {mode}, state {os.path.abspath(config.state_dir)}{metrics}")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
