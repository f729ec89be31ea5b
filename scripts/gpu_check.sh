#!/usr/bin/env bash
# One pass over what only a GPU shows, sized for a short device lease (about 8 minutes on an
# H200): the compiled Pallas GPU kernels against their references (the kernel tests, which run
# "gpu" variants compiled on a GPU and interpreted elsewhere), the engine with the kernels, and
# the kernel and model benchmarks. Logs go to $OUT (or ./gpu_check_out); a summary prints last.
#   bash scripts/gpu_check.sh            # from the repo root, on a machine with a CUDA jax
# Missing pure-Python dependencies can travel as wheels in .whl/ (installed to /tmp/site).
set -u
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
step() {  # step NAME SECONDS COMMAND...: runs under a time limit, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}
nvidia-smi -L | tee "$OUT/summary.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
PYTEST="python3 -m pytest -q -p no:cacheprovider -o addopts="
step kernels 150 $PYTEST tests/test_paged_attention.py tests/test_ragged_attention.py \
  tests/test_int8_matmul.py -k "gpu or dispatch"
step int8_matmul 50 python3 -m pallas_kernels.int8_matmul.benchmark --m_sizes=1,8,64 \
  --shapes=smollm2,llama8b --runs=20
step paged_decode 50 python3 -m pallas_kernels.paged_attention.benchmark --batch=8 \
  --context_lens=512,2048,8192 --repeats=20
step ragged_prefill 50 python3 -m pallas_kernels.paged_attention.benchmark --prefill --repeats=10
step engine 80 $PYTEST tests/test_engine.py tests/test_chunked_prefill.py \
  tests/test_attention_impl.py -k "pallas or auto" -m "not slow"
step model_decode 70 python3 - <<'PY'
import jax, jinfer
from jinfer import benchmark
import time
import jax.numpy as jnp
# The roofline's bandwidth: a device copy (bytes read + written), not the host's GEMVs.
x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
copy = jax.jit(lambda x: x + 1)
jax.block_until_ready(copy(x))
start = time.perf_counter()
for _ in range(20):
  y = copy(x)
jax.block_until_ready(y)
gbps = 20 * 2 * x.nbytes / (time.perf_counter() - start) / 1e9
print(f"device copy: {gbps:.0f} GB/s (read + write)")
del x, y
model = jinfer.model.random_model("smollm2-135m", dtype="bfloat16")
cfg = benchmark.BenchConfig(batch_sizes=(1, 8, 64), dtypes=("bfloat16",), new_tokens=128,
                            repeats=3, bandwidth_gbps=gbps)
result = benchmark.run_benchmark(model, cfg, peers=())
print(result["facts"])
for row in result["rows"]:
  print(f"| {row['dtype']} | batch {row['batch']} | {row['decode_tok_s']:.0f} tok/s "
        f"| {row['ms_per_step']:.2f} ms/step | prefill {row['prefill_ms']:.1f} ms "
        f"| ceiling fraction {row['bandwidth_fraction']} |")
PY
echo "--- failures"; grep -hE "FAILED|Error|error:" "$OUT"/kernels.log "$OUT"/engine.log | head -40
for f in kernels engine; do echo "--- $f"; tail -3 "$OUT/$f.log"; done
for f in int8_matmul paged_decode ragged_prefill model_decode; do
  echo "--- $f"; grep -E "^\||device|GB/s|note" "$OUT/$f.log" | head -40; tail -3 "$OUT/$f.log"
done
cat "$OUT/summary.txt"
