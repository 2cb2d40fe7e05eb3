# Sourced by the scripts that run on the lent GPU machine: $PY, the Python that has PyTorch,
# and the CUDA, cuBLAS and cuDNN libraries of its wheels on the loader's path (the CUDA build
# of sparkle links against them; the machine has no CUDA toolkit of its own).
PY=python3; [ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
SP=$($PY -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$SP/nvidia/cu13/lib:$SP/nvidia/cudnn/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
