"""Cluster and workload descriptions for the scaling planner: pure Python, no TensorFlow.

A `Cluster` is what the latency-bandwidth (alpha-beta) cost model needs to know about a
machine room: how many accelerators, how many share a node, the latency and bandwidth of
the links inside a node and of each node's network interface, and the cost of adding
bytes (gamma). A `Workload` is the model being trained: its number of gradient values,
their dtype, and the compute time of one step.

Units everywhere: seconds, bytes, bytes per second (1 GB/s = 1e9 bytes/s), images per
second.

`PRESETS` holds the four seed systems (see `docs/scaling.md` for the sources of each
number, and which are estimates):

* ``"akiba"``: 1,024 P100 (128 nodes x 8) on FDR InfiniBand; Akiba, Suzuki, Fukuda,
  "Extremely Large Minibatch SGD", arXiv:1711.04325.
* ``"mikami"``: 3,456 V100 (864 ABCI nodes x 4) on dual EDR InfiniBand; Mikami et al.,
  "Massively Distributed SGD", arXiv:1811.05233 (the paper also runs 1,088 and 2,176).
* ``"ying"``: 1,024 TPU v3 chips on the 2-D torus inter-chip interconnect; Ying et al.,
  "Image Classification at Supercomputer Scale", arXiv:1811.06992.
* ``"yamazaki"``: 2,048 V100 (512 ABCI nodes x 4) on dual EDR InfiniBand; Yamazaki,
  Kasagi et al., "Yet Another Accelerated SGD", arXiv:1903.12650.
"""

import dataclasses
import math

__all__ = [
    "Link",
    "Cluster",
    "Workload",
    "Preset",
    "PRESETS",
    "get_preset",
    "cluster_from_dict",
    "workload_from_dict",
    "GIGA",
    "MICRO",
]

GIGA = 1e9
"""float: bytes per second in one GB/s (decimal), the unit of the bandwidth flags."""

MICRO = 1e-6
"""float: seconds in one microsecond, the unit of the latency flags."""

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _check_number(name, value, minimum=None, strict=False, allow_inf=False):
    """Returns `value` as a float after checking its type and bound (Keras-style errors)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Argument `{name}` must be a number. Received: {name}={value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"Argument `{name}` must be finite. Received: {name}={value}")
    if minimum is not None:
        if strict and not value > minimum:
            raise ValueError(f"Argument `{name}` must be > {minimum}. Received: {name}={value}")
        if not strict and not value >= minimum:
            raise ValueError(f"Argument `{name}` must be >= {minimum}. Received: {name}={value}")
    return value


def _check_int(name, value, minimum):
    """Returns `value` as an int >= `minimum` (Keras-style errors)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"Argument `{name}` must be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"Argument `{name}` must be >= {minimum}. Received: {name}={value}")
    return value


@dataclasses.dataclass(frozen=True)
class Link:
    """One kind of link in the Hockney latency-bandwidth model.

    Sending ``m`` bytes over the link takes ``latency_s + m / bandwidth_bytes_per_s``
    seconds: ``alpha + m * beta`` with ``beta = 1 / bandwidth`` (Hockney, "The
    communication challenge for MPP: Intel Paragon and Meiko CS-2", Parallel Computing
    20(3), 1994).

    Attributes:
      latency_s: float >= 0, alpha: seconds per message (one step of a collective,
        including software overhead, not just the wire).
      bandwidth_bytes_per_s: float > 0, 1/beta: bytes per second in one direction. For
        the inter-node link of a `Cluster` this is the node's whole network bandwidth (all
        its network cards), shared by the flows that leave the node at the same time.

    Raises:
      TypeError: if an attribute is not a number.
      ValueError: if `latency_s` < 0 or `bandwidth_bytes_per_s` <= 0 or not finite.
    """

    latency_s: float
    bandwidth_bytes_per_s: float

    def __post_init__(self):
        object.__setattr__(self, "latency_s", _check_number("latency_s", self.latency_s, 0.0))
        object.__setattr__(
            self,
            "bandwidth_bytes_per_s",
            _check_number("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, 0.0, strict=True),
        )

    @property
    def beta_s_per_byte(self):
        """float: beta, seconds per byte, ``1 / bandwidth_bytes_per_s``."""
        return 1.0 / self.bandwidth_bytes_per_s

    @classmethod
    def from_us_gbps(cls, latency_us, bandwidth_gb_per_s):
        """Builds a link from a latency in microseconds and a bandwidth in GB/s (1e9 B/s).

        Raises:
          TypeError, ValueError: as the constructor.
        """
        latency_us = _check_number("latency_us", latency_us, 0.0)
        bandwidth_gb_per_s = _check_number("bandwidth_gb_per_s", bandwidth_gb_per_s, 0.0, strict=True)
        return cls(latency_us * MICRO, bandwidth_gb_per_s * GIGA)

    def to_dict(self):
        """Returns ``{"latency_us": ..., "bandwidth_gb_per_s": ...}`` (JSON-friendly)."""
        return {
            "latency_us": self.latency_s / MICRO,
            "bandwidth_gb_per_s": self.bandwidth_bytes_per_s / GIGA,
        }


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A cluster of accelerators grouped into nodes, as the cost model sees it.

    Ranks are numbered node-major: rank ``r`` lives on node ``r // accelerators_per_node``.
    Two accelerators on one node talk over `intra_node`; a message between nodes pays
    `inter_node`'s latency and shares the sending node's `inter_node` bandwidth with the
    other messages leaving that node in the same step.

    Attributes:
      num_accelerators: int >= 1, N, the number of workers (GPUs, TPU chips, processes).
      accelerators_per_node: int >= 1 dividing `num_accelerators`.
      intra_node: `Link` between two accelerators of one node (NVLink, PCIe, loopback).
      inter_node: `Link` out of one node (its network cards together).
      gamma_s_per_byte: float >= 0, gamma: seconds to add one byte of a received buffer
        into the local one (Thakur, Rabenseifner, Gropp, "Optimization of Collective
        Communication Operations in MPICH", IJHPCA 19(1), 2005). Default 0.
      launch_overhead_s: float >= 0, delta: fixed seconds per collective call (kernel
        launch, collective-runtime set-up), paid once per phase that is a separate
        collective (the torus makes 3 calls per pack, the ring 1). Default 0 (negligible
        next to the step latencies of a large cluster; it matters on an oversubscribed
        single machine, where `--calibrate` measures it).
      name: str, a label for tables. Default ``"custom"``.
      description: str, free text (hardware, sources). Default ``""``.

    Raises:
      TypeError: if an attribute has the wrong type.
      ValueError: if `num_accelerators` or `accelerators_per_node` < 1, if
        `accelerators_per_node` does not divide `num_accelerators`, or `gamma_s_per_byte`
        < 0.
    """

    num_accelerators: int
    accelerators_per_node: int
    intra_node: Link
    inter_node: Link
    gamma_s_per_byte: float = 0.0
    name: str = "custom"
    description: str = ""
    launch_overhead_s: float = 0.0

    def __post_init__(self):
        n = _check_int("num_accelerators", self.num_accelerators, 1)
        k = _check_int("accelerators_per_node", self.accelerators_per_node, 1)
        if n % k:
            raise ValueError(
                "Argument `num_accelerators` must be a multiple of `accelerators_per_node`. "
                f"Received: num_accelerators={n}, accelerators_per_node={k}"
            )
        for field in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, field), Link):
                raise TypeError(
                    f"Argument `{field}` must be a tfscale.planning.Link. "
                    f"Received: {field}={getattr(self, field)!r}"
                )
        object.__setattr__(self, "num_accelerators", n)
        object.__setattr__(self, "accelerators_per_node", k)
        object.__setattr__(
            self, "gamma_s_per_byte", _check_number("gamma_s_per_byte", self.gamma_s_per_byte, 0.0)
        )
        object.__setattr__(
            self,
            "launch_overhead_s",
            _check_number("launch_overhead_s", self.launch_overhead_s, 0.0),
        )

    @property
    def num_nodes(self):
        """int: ``num_accelerators // accelerators_per_node``."""
        return self.num_accelerators // self.accelerators_per_node

    def node_of(self, rank):
        """Returns the node index (int) of `rank`, ``rank // accelerators_per_node``."""
        return rank // self.accelerators_per_node

    def with_num_accelerators(self, num_accelerators):
        """Returns a copy with `num_accelerators` changed (links and node size kept).

        Raises:
          ValueError: if the new count is < 1 or not a multiple of `accelerators_per_node`.
        """
        return dataclasses.replace(self, num_accelerators=num_accelerators)

    def to_dict(self):
        """Returns a JSON-friendly dict that `cluster_from_dict` reads back."""
        return {
            "name": self.name,
            "description": self.description,
            "num_accelerators": self.num_accelerators,
            "accelerators_per_node": self.accelerators_per_node,
            "intra_node": self.intra_node.to_dict(),
            "inter_node": self.inter_node.to_dict(),
            "gamma_ns_per_byte": self.gamma_s_per_byte * 1e9,
            "launch_overhead_us": self.launch_overhead_s / MICRO,
        }


def _link_from_dict(name, value):
    if isinstance(value, Link):
        return value
    if not isinstance(value, dict) or set(value) != {"latency_us", "bandwidth_gb_per_s"}:
        raise ValueError(
            f"Argument `{name}` must be a dict with keys 'latency_us' and "
            f"'bandwidth_gb_per_s'. Received: {name}={value!r}"
        )
    return Link.from_us_gbps(value["latency_us"], value["bandwidth_gb_per_s"])


def cluster_from_dict(config):
    """Builds a `Cluster` from the dict that `Cluster.to_dict` (or a JSON file) gives.

    Args:
      config: dict with keys ``num_accelerators`` (int), ``accelerators_per_node`` (int),
        ``intra_node`` and ``inter_node`` (each ``{"latency_us": float,
        "bandwidth_gb_per_s": float}``), and optional ``gamma_ns_per_byte`` (float,
        nanoseconds per byte, default 0), ``launch_overhead_us`` (float, microseconds
        per collective call, default 0), ``name``, ``description``.

    Returns:
      A `Cluster`.

    Raises:
      ValueError: if a key is missing or unknown, or a value is out of range.
      TypeError: if a value has the wrong type.
    """
    if not isinstance(config, dict):
        raise TypeError(f"Argument `config` must be a dict. Received: config={config!r}")
    required = {"num_accelerators", "accelerators_per_node", "intra_node", "inter_node"}
    optional = {"gamma_ns_per_byte", "launch_overhead_us", "name", "description"}
    missing = sorted(required - set(config))
    unknown = sorted(set(config) - required - optional)
    if missing or unknown:
        raise ValueError(
            f"Argument `config` is missing keys {missing} / has unknown keys {unknown}; "
            f"expected keys {sorted(required)} and optionally {sorted(optional)}."
        )
    return Cluster(
        num_accelerators=config["num_accelerators"],
        accelerators_per_node=config["accelerators_per_node"],
        intra_node=_link_from_dict("intra_node", config["intra_node"]),
        inter_node=_link_from_dict("inter_node", config["inter_node"]),
        gamma_s_per_byte=_check_number(
            "gamma_ns_per_byte", config.get("gamma_ns_per_byte", 0.0), 0.0
        )
        * 1e-9,
        name=str(config.get("name", "custom")),
        description=str(config.get("description", "")),
        launch_overhead_s=_check_number(
            "launch_overhead_us", config.get("launch_overhead_us", 0.0), 0.0
        )
        * MICRO,
    )


@dataclasses.dataclass(frozen=True)
class Workload:
    """The training job whose gradients are all-reduced once per step.

    Attributes:
      num_parameters: int >= 1, gradient values per step. Default 25,557,032
        (ResNet-50 v1.5, "25.6M").
      gradient_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``, the dtype of the
        gradients before any wire compression. Default ``"float32"``.
      num_tensors: int >= 1, gradient tensors (one all-reduce each when nothing is fused).
        Default 161 (ResNet-50: 53 conv kernels, 53 BN gammas and 53 betas, the dense
        kernel and bias; 214 with the bias of every conv as in Keras's `ResNet50`).
      per_accelerator_batch: int >= 1, images per accelerator per step. Default 32.
      images_per_second_per_accelerator: float > 0, the one-accelerator training
        throughput (images/s) at that batch, no communication. Default 1,000.
      overlap: float in [0, 1], the fraction of the all-reduce hidden behind the backward
        pass (0: none, the conservative default; 1: fully hidden).

    Raises:
      TypeError, ValueError: for an attribute of the wrong type or out of range.
    """

    num_parameters: int = 25_557_032
    gradient_dtype: str = "float32"
    num_tensors: int = 161
    per_accelerator_batch: int = 32
    images_per_second_per_accelerator: float = 1000.0
    overlap: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "num_parameters", _check_int("num_parameters", self.num_parameters, 1))
        object.__setattr__(self, "num_tensors", _check_int("num_tensors", self.num_tensors, 1))
        object.__setattr__(
            self, "per_accelerator_batch", _check_int("per_accelerator_batch", self.per_accelerator_batch, 1)
        )
        if self.gradient_dtype not in _DTYPE_BYTES:
            raise ValueError(
                f"Argument `gradient_dtype` must be one of {sorted(_DTYPE_BYTES)}. "
                f"Received: gradient_dtype={self.gradient_dtype!r}"
            )
        object.__setattr__(
            self,
            "images_per_second_per_accelerator",
            _check_number(
                "images_per_second_per_accelerator",
                self.images_per_second_per_accelerator,
                0.0,
                strict=True,
            ),
        )
        overlap = _check_number("overlap", self.overlap, 0.0)
        if overlap > 1.0:
            raise ValueError(f"Argument `overlap` must be <= 1. Received: overlap={overlap}")
        object.__setattr__(self, "overlap", overlap)

    @property
    def bytes_per_value(self):
        """int: bytes of one gradient value in `gradient_dtype` (4 or 2)."""
        return _DTYPE_BYTES[self.gradient_dtype]

    @property
    def gradient_bytes(self):
        """int: bytes of all gradients of one replica, ``num_parameters * bytes_per_value``."""
        return self.num_parameters * self.bytes_per_value

    @property
    def compute_time_s(self):
        """float: seconds of one step on one accelerator, batch / (images/s)."""
        return self.per_accelerator_batch / self.images_per_second_per_accelerator

    def to_dict(self):
        """Returns a JSON-friendly dict that `workload_from_dict` reads back."""
        return dataclasses.asdict(self)


def workload_from_dict(config):
    """Builds a `Workload` from a dict of its attribute names (see `Workload`).

    Raises:
      ValueError: for an unknown key or a value out of range.
      TypeError: for a value of the wrong type.
    """
    if not isinstance(config, dict):
        raise TypeError(f"Argument `config` must be a dict. Received: config={config!r}")
    fields = {f.name for f in dataclasses.fields(Workload)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"Argument `config` has unknown keys {unknown}; expected a subset of {sorted(fields)}."
        )
    return Workload(**config)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A seed system: its cluster, its workload, and what its paper reports.

    Attributes:
      cluster: `Cluster`.
      workload: `Workload` (ResNet-50 with the paper's per-accelerator batch).
      compression: None, ``"float16"`` or ``"bfloat16"``, the wire dtype the paper used.
      algorithm: str, the all-reduce the paper used (a key of
        `tfscale.planning.ALGORITHMS`).
      reported: dict mapping a number of accelerators (int) to the scaling efficiency the
        paper reports there (float in [0, 1]); empty when the paper gives none.
      source: str, the paper and arXiv id.
      algorithms: tuple of str, the candidates that fit the network: all four on a
        switched (fat-tree) network; only ring and torus on a physical 2-D torus (TPU),
        where halving-doubling partners are not neighbours and their messages would share
        links, which this model does not count.
    """

    cluster: Cluster
    workload: Workload
    compression: object = None
    algorithm: str = "ring"
    reported: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    algorithms: tuple = ("ring", "halving_doubling", "hierarchical", "torus")


def _abci_cluster(name, num, description):
    # ABCI compute node: 4 V100 SXM2 on NVLink 2 (hybrid cube mesh; NCCL rings reach
    # about 130 GB/s bus bandwidth, *estimate*), two EDR InfiniBand cards per node
    # (2 x 100 Gb/s = 25 GB/s, ~23 GB/s achievable). Latencies are NCCL per-step
    # software latencies, not wire latencies (*estimates*).
    return Cluster(
        num_accelerators=num,
        accelerators_per_node=4,
        intra_node=Link.from_us_gbps(5.0, 130.0),
        inter_node=Link.from_us_gbps(8.0, 23.0),
        gamma_s_per_byte=0.0,
        name=name,
        description=description,
    )


PRESETS = {
    "akiba": Preset(
        cluster=Cluster(
            num_accelerators=1024,
            accelerators_per_node=8,
            # MN-1: 8 P100 PCIe per node (PCIe gen3 x16, ~10 GB/s achievable), FDR
            # InfiniBand 56 Gb/s per node (~6.0 GB/s achievable). Latencies: *estimates*.
            intra_node=Link.from_us_gbps(10.0, 10.0),
            inter_node=Link.from_us_gbps(10.0, 6.0),
            name="akiba",
            description="1,024 P100, 128 nodes x 8, FDR InfiniBand (MN-1), ChainerMN",
        ),
        # 32k batch / 1,024 GPUs; ~200 img/s per P100 (fp32 Chainer, *estimate*); the
        # paper communicates in fp16.
        workload=Workload(per_accelerator_batch=32, images_per_second_per_accelerator=200.0),
        compression="float16",
        algorithm="hierarchical",
        reported={1024: 0.80},
        source="Akiba, Suzuki, Fukuda, arXiv:1711.04325",
    ),
    "mikami": Preset(
        cluster=_abci_cluster(
            "mikami", 3456, "3,456 V100, 864 ABCI nodes x 4, dual EDR InfiniBand, NNL"
        ),
        # ~34k batch / 1,088 GPUs = 32 per GPU; fp16 training, ~1,000 img/s per V100
        # (*estimate* between Fujitsu's 845 and NVIDIA's 1,270).
        workload=Workload(
            gradient_dtype="float16",
            per_accelerator_batch=32,
            images_per_second_per_accelerator=1000.0,
        ),
        compression=None,
        algorithm="torus",
        reported={1088: 0.916},
        source="Mikami et al., arXiv:1811.05233",
    ),
    "ying": Preset(
        cluster=Cluster(
            num_accelerators=1024,
            # ICI links are per chip, so every chip is its own "node" here; a ring or a
            # torus over the 32 x 32 pod maps onto neighbour links. ~70 GB/s per link per
            # direction and ~2 us per step are *estimates*.
            accelerators_per_node=1,
            intra_node=Link.from_us_gbps(2.0, 70.0),
            inter_node=Link.from_us_gbps(2.0, 70.0),
            name="ying",
            description="1,024 TPU v3 chips, 32 x 32 2-D torus interconnect",
        ),
        # 32k batch / 1,024 chips; ~1,025 img/s per chip (Ying et al.), bf16 on the wire.
        workload=Workload(per_accelerator_batch=32, images_per_second_per_accelerator=1025.0),
        compression="bfloat16",
        algorithm="torus",
        reported={},
        source="Ying et al., arXiv:1811.06992",
        algorithms=("ring", "torus"),
    ),
    "yamazaki": Preset(
        cluster=_abci_cluster(
            "yamazaki", 2048, "2,048 V100, 512 ABCI nodes x 4, dual EDR InfiniBand, MXNet"
        ),
        # 81,920 batch / 2,048 GPUs = 40 per GPU; fp16; ~845 img/s per V100 (Fujitsu).
        workload=Workload(
            gradient_dtype="float16",
            per_accelerator_batch=40,
            images_per_second_per_accelerator=845.0,
        ),
        compression=None,
        algorithm="hierarchical",
        reported={},
        source="Yamazaki, Kasagi et al., arXiv:1903.12650",
    ),
}
"""dict: preset name -> `Preset` for the four seed systems."""


def get_preset(name):
    """Returns the `Preset` called `name` (a key of `PRESETS`).

    Raises:
      ValueError: if `name` is unknown; the message lists the valid names.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown cluster preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]

