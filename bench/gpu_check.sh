#!/usr/bin/env bash
# Real-size GPU check (a session lent a GPU runs this through the device tool; CI never has one):
#   bash bench/gpu_check.sh
# Installs the pack, tries the optional attention kernels (no failure if they do not install), runs
# bench/gpu_check.py (1.3B shapes, 480x832x81, bf16, 3 steps). About 5 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
pip install -q -e . >/dev/null
pip install -q sageattention >/dev/null 2>&1 || echo "sageattention: not installable here"
python -c "import flash_attn" 2>/dev/null || echo "flash-attn: not installed (building it takes too long for this check)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python bench/gpu_check.py
