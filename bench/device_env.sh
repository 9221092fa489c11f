# Source on the GPU machine (bash): installs the wheels in .whl/ (FlashInfer and its FFI
# runtime, filled by ../shared/gpu/wheels.sh) into .site/ offline and puts the project on the path.
# Usage: `. bench/device_env.sh && python3 -m pytest -q -m gpu tests`
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || return 1
export PYTHONPATH=$PWD/.site:$PWD
# redknot_rag.kernels / .retrieval are mapped by setuptools on an install; on the bare path the
# links stand in for that mapping (both are git-ignored).
ln -sfn ../kernels redknot_rag/kernels
ln -sfn ../retrieval redknot_rag/retrieval
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
