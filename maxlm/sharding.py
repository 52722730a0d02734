"""Device mesh, logical-axis rules and helpers that shard pytrees and batches.

Every parameter and main activation in maxlm carries *logical* axis names
(``embed``, ``heads``, ``activation_batch`` ...). A rules table maps each
logical name to zero or more *mesh* axes (``data``, ``fsdp``, ``tensor``).
Changing the parallelism layout of a run is therefore a config change only.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (a str, a tuple of str, or None = replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills the single -1 entry with the remaining devices; checks the product."""
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for name, size in zip(MESH_AXES, shape):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: sizes must be positive or -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split as data={data}, fsdp={fsdp}, tensor={tensor}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {int(np.prod(shape))} but {num_devices} devices are available "
            f"(mesh.data={data}, mesh.fsdp={fsdp}, mesh.tensor={tensor})")
    return tuple(shape)  # type: ignore[return-value]


def use_cpu_devices(count: int) -> None:
    """Makes the CPU backend show ``count`` devices (``mesh.cpu_devices``); 0 leaves JAX's default.

    Must run before JAX starts its backends; afterwards it only checks that the count already holds.
    Other backends (GPU, TPU) are unaffected.
    """
    if not count:
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already started: fine if they already have this many CPU devices
        have = len(jax.devices("cpu"))
        if have != count:
            raise ValueError(f"mesh.cpu_devices={count}, but JAX already started with {have} CPU devices; "
                             "set it before anything touches jax.devices()") from None


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None,
              dcn: tuple[int, int, int] = (1, 1, 1)) -> Mesh:
    """A (data, fsdp, tensor) mesh in Auto mode, so XLA propagates the shardings.

    ``dcn``: how many of each axis's devices are in different slices (TPU) or processes (GPU, CPU), the
    slow network between them; the rest of each axis stays inside a slice or host (a hybrid mesh).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 3
    if dcn == (1, 1, 1):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    from jax.experimental import mesh_utils

    inner = tuple(size // d for size, d in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(inner, dcn, devices,
                                                process_is_granule=devices[0].platform != "tpu")
    return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    if not names:
        return P()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in mesh.rules")
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. a vocab of 50257 over tensor=2)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names]))
        fitted.append(axes if dim % size == 0 else None)
    return P(*fitted)


def partitioned_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh XLA partitions the code being traced over: None outside a mesh context and inside a
    ``shard_map`` that is manual over every axis (there each device runs on its own shard)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.are_all_axes_manual else mesh


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
    """Sharding constraint on an activation; a no-op where nothing is partitioned (see ``partitioned_mesh``)."""
    if partitioned_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def named_shardings(mesh: Mesh, specs):
    """PartitionSpec pytree -> NamedSharding pytree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def on_device(tree, device: jax.Device | None = None):
    """``tree``'s leaves (anything with ``shape`` and ``dtype``) as ``jax.ShapeDtypeStruct`` on ``device``
    alone (default: the first device): restore targets and one-device compiles."""
    single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), tree)


def batch_spec(rules: Rules) -> P:
    """Spec of a [batch, seq] data array."""
    return logical_to_spec(("activation_batch", "activation_length"), rules)


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules,
                    stacked: bool = False) -> dict[str, jax.Array]:
    """Assembles each process's local rows into global arrays sharded over the batch axes.

    ``stacked``: the arrays are ``[steps, rows, ...]``, batches for several steps (``train.steps_per_call``).
    """
    spec = batch_spec(rules)
    sharding = NamedSharding(mesh, P(None, *spec) if stacked else spec)
    if jax.process_count() == 1:  # local rows are the global batch: one batched transfer for all arrays
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
