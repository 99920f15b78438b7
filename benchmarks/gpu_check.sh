#!/usr/bin/env bash
# GPU check for a machine with CUDA (about 3-5 minutes, well under 8):
#   1. installs the project (torch is used as found, else torch==2.14.1 / torchvision==0.29.1),
#   2. measures the SBN train-step ratio of ResNet-50 (recipe resnet) with AMP bf16, in channel and
#      in frequency mode (one run times plain, channel and frequency interleaved), at the CPU
#      benchmark's shape (batch 16, 128x128) and at a GPU-sized one (batch 128, 224x224, also
#      channels_last), with images/s,
#   3. times the frequency-mode layer (FFT, matmul DFT, auto) against BatchNorm2d at ResNet-50's
#      stage shapes and at small maps, which checks the CUDA crossover in layers/checks.py,
#   4. fine-tunes resnet18 on digits for one epoch on CUDA (AMP bf16 by default) as a smoke test,
#      and one more epoch with timm's recipe parts: lamb, EMA, mixup/cutmix, --grad-accum-steps 2
#      and gradient clipping.
# Prints ONE JSON object on stdout; progress goes to stderr. Any failure stops it (exit != 0).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; runs in the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[gpu_check] $*" >&2; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PY="${PYTHON:-python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    log "installing torch==2.14.1 torchvision==0.29.1"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 >&2
fi
if "$PY" -c "import timm, safetensors, typer, rich, yaml, pydantic, onnx, sklearn, matplotlib" 2>/dev/null; then
    log "installing the project (editable, dependencies already present)"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
else
    log "installing the project with its dependencies"
    "$PY" -m pip install -q -e . >&2
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || {
    log "no CUDA device visible to torch $("$PY" -c 'import torch; print(torch.__version__)')"; exit 3; }

bench() {  # name, extra args...
    local name="$1"; shift
    log "train_step $name: $*"
    timeout 240 "$PY" benchmarks/train_step.py --device cuda --amp "$@" > "$TMP/$name.json"
}
bench cpu_shape --batch 16 --size 128 --repeats 30 --warmup 5
bench gpu_shape --batch 128 --size 224 --repeats 20 --warmup 5
bench gpu_shape_cl --batch 128 --size 224 --repeats 20 --warmup 5 --channels-last

log "layer: frequency mode (fft, matmul, auto) against BatchNorm2d"
timeout 180 "$PY" benchmarks/layer.py --device cuda --stats frequency --repeats 15 \
    > "$TMP/layer_stages.json"
timeout 180 "$PY" benchmarks/layer.py --device cuda --stats frequency --repeats 15 \
    --sizes 4,8,16,32,48,64 > "$TMP/layer_sizes.json"

log "finetune smoke: resnet18 on digits, 1 epoch"
timeout 240 sbn-surgery finetune resnet18 --recipe resnet --data digits --epochs 1 \
    --device cuda -o "$TMP/ft" --json > "$TMP/finetune.json"
log "finetune with EMA, mixup/cutmix, grad accumulation 2: resnet18 on digits, 1 epoch"
timeout 240 sbn-surgery finetune resnet18 --recipe resnet --data digits --epochs 1 --opt lamb \
    --model-ema --model-ema-warmup --mixup 0.2 --cutmix 1.0 --grad-accum-steps 2 \
    --clip-grad 1.0 --device cuda -o "$TMP/ft_timm" --json > "$TMP/finetune_timm.json"

"$PY" - "$TMP" <<'EOF'
import json, sys, pathlib
import torch
tmp = pathlib.Path(sys.argv[1])
out = {"check": "gpu_check", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "cuda": torch.version.cuda}
for name in ("cpu_shape", "gpu_shape", "gpu_shape_cl"):
    r = json.loads((tmp / f"{name}.json").read_text())
    assert r["device"].startswith("cuda") and r["amp_bf16"], r
    out[name] = {k: r[k] for k in ("batch", "input_size", "channels_last", "plain_median_ms",
                                   "plain_images_per_s")}
    for mode in ("channel", "frequency"):
        assert r[mode]["ratio"] > 0 and r[mode]["sbn_layers"] > 0, r
        out[name][mode] = {k: r[mode][k] for k in ("median_ms", "ratio", "images_per_s")}
for name in ("layer_stages", "layer_sizes"):
    r = json.loads((tmp / f"{name}.json").read_text())
    assert r["device"] == "cuda", r
    out[name] = {f"{'x'.join(map(str, row['shape'][2:]))} {row['case']}": row["ratio_to_bn"]
                 for row in r["results"]}
ft = json.loads((tmp / "finetune.json").read_text())
assert 0.0 <= ft["val_top1"] <= 1.0 and ft["epochs"] == 1, ft
out["finetune_digits_1_epoch"] = {k: ft[k] for k in ("val_top1", "val_loss", "images_per_s")}
ft = json.loads((tmp / "finetune_timm.json").read_text())
row = json.loads((tmp / "ft_timm" / "metrics.jsonl").read_text().splitlines()[-1])
assert ft["epochs"] == 1 and row["ema_top1"] is not None and (tmp / "ft_timm" / "ema.safetensors").is_file(), row
out["finetune_digits_timm_recipe"] = {"val_top1": ft["val_top1"], "ema_top1": row["ema_top1"],
                                      "images_per_s": ft["images_per_s"]}
print(json.dumps(out, indent=2))
EOF

# --------------------------------------------------------------------------------------------
# Study (opt-in, long: 15 runs x 30 epochs of resnet18 on 60000 images, then 15 runs x 5 epochs;
# budget about 30-60 min on one large GPU):
#   bash benchmarks/gpu_check.sh --study [DIR]
# runs, after the checks above, README's two studies (section "Study") at full scale on CUDA:
#   1. resnet18 from scratch on all of Fashion-MNIST (60000 train, 10000 val) at 32x32 with
#      output_stride 8 (SBN sites on 4x4 maps), arms none, resnet and resnet:frequency, 5 seeds,
#      30 epochs, into DIR (default runs/gpu_study);
#   2. the tool's workflow: each seed's trained none model fine-tuned 5 more epochs without SBN
#      and, converted with identity init, with SBN (--from-study DIR), into DIR-finetune.
# Both are resumable: if the session ends, the same sbn-surgery commands (logged below) continue
# them. Fashion-MNIST must be on the machine (Debian package dataset-fashion-mnist) or
# downloadable. With --study two more JSON objects follow the first on stdout: the studies'
# tables (top-1 and the feature-map measures, paired against none).
if [[ "${1:-}" == "--study" ]]; then
    SDIR="${2:-runs/gpu_study}"
    COMMON=(--data fashion-mnist --input-size 3 32 32 --model-kwargs output_stride=8
            --batch-size 128 --device cuda --json)
    SCMD=(sbn-surgery study resnet18 "${COMMON[@]}" --arms none,resnet,resnet:frequency
          --seeds 5 --epochs 30 -o "$SDIR")
    FCMD=(sbn-surgery study resnet18 "${COMMON[@]}" --arms none,resnet,resnet:frequency
          --seeds 5 --epochs 5 --lr 0.01 --warmup-epochs 0 --from-study "$SDIR"
          -o "$SDIR-finetune")
    log "study: ${SCMD[*]}"
    "${SCMD[@]}" > "$TMP/study.json"
    log "second study: ${FCMD[*]}"
    "${FCMD[@]}" > "$TMP/study_finetune.json"
    for name in study study_finetune; do
        "$PY" - "$TMP/$name.json" "$name" <<'EOF_STUDY'
import json, math, sys
doc = json.load(open(sys.argv[1]))
names = [a["name"] for a in doc["arms"]]
assert names == ["none", "resnet", "resnet:frequency"], names
for a in doc["arms"]:
    assert len(a["runs"]) == 5 and 0.0 <= a["top1_mean"] <= 1.0, a
    assert a["features"]["max_abs"] is not None and a["features"]["spectral_entropy"], a
for d in doc["differences"]:
    assert d["vs"] == "none" and all(math.isfinite(v) for v in d["ci95"]), d
keys = ("max_abs", "max_abs_peak", "rms", "spectral_entropy")
out = {"check": f"gpu_{sys.argv[2]}", "from_study": doc["from_study"],
       "feature_images": doc["feature_images"],
       "arms": [{**{k: a[k] for k in ("name", "top1_mean", "top1_std", "loss_mean",
                                      "images_per_s", "step_ratio", "rms_growth")},
                 "features": {k: a["features"][k] for k in keys}} for a in doc["arms"]],
       "differences": [{**{k: d[k] for k in ("arm", "vs", "mean", "ci95", "verdict")},
                        "features": {k: d["features"][k] for k in keys}}
                       for d in doc["differences"]],
       "plots": [doc["plot"], doc["features_plot"]]}
print(json.dumps(out, indent=2))
EOF_STUDY
    done
fi
