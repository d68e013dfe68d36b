"""Every attention implementation lowers ahead of time, from CPU, for each accelerator backend it claims, at
BAGEL's real shapes (docs/gpu.md has the table of what runs where).

Shapes: the ViT (SigLIP so400m: 16 heads of 72, not a power of two; 2,560 and 2,555 patches), the 1.5B-class decoder
(12 / 2 heads of 128) and BAGEL-7B's decoder (28 / 4 heads of 128) at 8k and 32k tokens per pack. Each program
is the train step's: ``vmap`` (the data-parallel group axis of ``bagel_jax/train/step.py``) of the gradient of a
bf16 attention (the forward runs inside). Lowering stops before the device compiler (Triton, Mosaic, cuDNN
need the hardware), so register or memory limits of the devices are not checked here; shape errors (Triton's
power-of-two sizes, cuDNN's batching of its bias) are. Each lowering takes well under a second.

``cudnn``: jax asks the local cuDNN for its version and the GPU for its compute capability while tracing; the
test answers for a Hopper GPU with cuDNN 9.10 (monkeypatched in jax's private module, skipped if a jax
version no longer has those functions).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from bagel_jax.nn import attention as A
from bagel_jax.nn.attention import MaskVectors
from bagel_jax.nn.pallas_attention import flash_attention

# name: (tokens, query heads, kv heads, head_dim)
SHAPES = {
    "vit-so400m": (2560, 16, 16, 72),
    "vit-so400m-odd": (2555, 16, 16, 72),        # a pack of images whose patches add up to no multiple of a block
    "decoder-1.5b-8k": (8192, 12, 2, 128),
    "decoder-7b-8k": (8192, 28, 4, 128),
    "decoder-1.5b-32k": (32768, 12, 2, 128),
    "decoder-7b-32k": (32768, 28, 4, 128),
}
# the abstract device each platform is lowered for (Pallas reads the GPU generation / TPU version from it)
DEVICES = {
    "cuda": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda"),
    "tpu": dict(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
}
# what each implementation claims (docs/gpu.md); "xla" builds the dense mask and is lowered where "auto" may
# pick it (<= ACCELERATOR_AUTO_BLOCKED_MIN_LEN keys), "cudnn" only up to CUDNN_MAX_KEYS
CLAIMS = {
    "pallas": (("cuda", "tpu"), list(SHAPES)),
    "blocked": (("cuda", "tpu"), list(SHAPES)),
    "xla": (("cuda", "tpu"), [n for n, s in SHAPES.items() if s[0] <= A.ACCELERATOR_AUTO_BLOCKED_MIN_LEN]),
    "cudnn": (("cuda",), [n for n, s in SHAPES.items() if s[0] <= A.CUDNN_MAX_KEYS]),
}
CASES = [(impl, platform, shape) for impl, (platforms, shapes) in CLAIMS.items()
         for platform in platforms for shape in shapes]
KERNELS = {("pallas", "cuda"): {"__gpu$xla.gpu.triton": 3}, ("pallas", "tpu"): {"tpu_custom_call": 3},
           ("cudnn", "cuda"): {"__cudnn$fmhaScaleBiasSoftmax": 1, "__cudnn$fmhaScaleBiasSoftmaxBackward": 1},
           ("blocked", "cuda"): {}, ("blocked", "tpu"): {}, ("xla", "cuda"): {}, ("xla", "tpu"): {}}


@pytest.fixture
def hopper_cudnn(monkeypatch):
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    for name in ("check_cudnn_version", "check_compute_capability", "is_cuda_compute_capability_equal"):
        if not hasattr(fa, name):
            pytest.skip(f"this jax's cuDNN attention has no {name} to answer for a GPU")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)


def implementation(impl):
    if impl == "pallas":
        return lambda *a: flash_attention(*a, interpret=False)
    if impl == "cudnn":
        return A.cudnn_packed               # the "cudnn" path without its "is the backend a GPU" check
    return lambda *a: A.attention(*a, implementation=impl)


def lower_train_attention(impl, platform, L, H, K, dh) -> str:
    """StableHLO of ``vmap(grad(sum(attention)))`` over a group of 1, bf16, for ``platform``."""
    q = jax.ShapeDtypeStruct((1, 1, L, H, dh), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1, L, K, dh), jnp.bfloat16)
    vec = MaskVectors(*(jax.ShapeDtypeStruct((1, 1, L), jnp.int32),) * 3)
    fn = implementation(impl)
    loss = lambda q, k, v, qv, kv: fn(q, k, v, qv, kv).astype(jnp.float32).sum()
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(**DEVICES[platform]))
    with jax.sharding.use_abstract_mesh(mesh):
        traced = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))).trace(q, kv, kv, vec, vec)
        return traced.lower(lowering_platforms=(platform,)).as_text()


def square_tensors(text: str, L: int) -> list[str]:
    """Tensor types in ``text`` with two trailing dimensions of at least ``L`` (an ``[L, L]`` mask or scores)."""
    found = re.findall(r"tensor<((?:\d+x)*)(\d+)x(\d+)x\w+>", text)
    return [f"{a}{b}x{c}" for a, b, c in found if int(b) >= L and int(c) >= L]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("impl, platform, shape", CASES, ids=["-".join(c) for c in CASES])
def test_lowers_at_real_shapes(impl, platform, shape, request):
    if impl == "cudnn":
        request.getfixturevalue("hopper_cudnn")
    L, H, K, dh = SHAPES[shape]
    text = lower_train_attention(impl, platform, L, H, K, dh)
    calls = re.findall(r"custom_call @(\S+?)\(", text)
    want = KERNELS[(impl, platform)]
    assert {c: calls.count(c) for c in set(calls) if c in want or "cudnn" in c or "triton" in c
            or "tpu_custom" in c} == want
    square = square_tensors(text, L)
    if impl in ("pallas", "blocked"):
        assert square == [], f"{impl} builds an [L, L] tensor: {square[:3]}"
    else:                                   # the dense paths do (the check above can see one)
        assert square


def test_auto_never_picks_a_dense_path_at_32k():
    """"auto" on an accelerator: dense "xla" up to ACCELERATOR_AUTO_BLOCKED_MIN_LEN keys (measured faster on an
    H200 at 8k, docs/gpu.md), "blocked" above, for training and inference; the CPU values are unchanged."""
    for backend in ("gpu", "tpu"):
        for inference in (False, True):
            n = A.default_auto_min_len(backend, inference)
            assert n == 8192
            assert A.resolve_implementation("auto", 8192, auto_min_len=n) == "xla"
            assert A.resolve_implementation("auto", 8193, auto_min_len=n) == "blocked"
            assert A.resolve_implementation("auto", 32768, auto_min_len=n) == "blocked"
    assert A.default_auto_min_len("cpu") == A.AUTO_BLOCKED_MIN_LEN == 256
    assert A.default_auto_min_len("cpu", inference=True) == A.INFERENCE_AUTO_BLOCKED_MIN_LEN == 1024
    assert A.resolve_implementation("auto", 300) == ("blocked" if jax.default_backend() == "cpu" else "xla")


def test_cudnn_refuses_a_dense_mask_at_32k():
    x = jnp.zeros((1, A.CUDNN_MAX_KEYS + 2, 2, 128), jnp.bfloat16)
    vec = MaskVectors(*(jnp.ones((1, x.shape[1]), jnp.int32),) * 3)
    with pytest.raises(ValueError, match=r"dense \[16386, 16386\] mask; above 16384 keys use 'pallas' or 'blocked'"):
        jax.eval_shape(A.cudnn_packed, x, x, x, vec, vec)


def test_pallas_float32_dots_use_full_precision():
    """Float32 operands ask for Precision.HIGHEST in every kernel dot (Triton would use TF32: ~1e-3 relative
    error); bf16 operands keep the default."""
    def kernel_text(dtype):
        q = jax.ShapeDtypeStruct((1, 64, 2, 72), dtype)
        vec = MaskVectors(*(jax.ShapeDtypeStruct((1, 64), jnp.int32),) * 3)
        f = lambda q, k, v, a, b: flash_attention(q, k, v, a, b, interpret=False).astype(jnp.float32).sum()
        return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, q, q, vec, vec))
    # forward: 2 dots, dq: 3, dk/dv: 4, each once per platform branch (cuda, rocm, tpu) of lax.platform_dependent
    text32, text16 = kernel_text(jnp.float32), kernel_text(jnp.bfloat16)
    assert text32.count("dot_general[") == text16.count("dot_general[") == 27
    assert text32.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 27
    assert "Precision.HIGHEST" not in text16
