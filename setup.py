from setuptools import Extension, find_packages, setup

# Region-of-interest JPEG decoding (dizoo_imgcls/data/_jpeg_region.c): built where libjpeg-turbo's headers are
# installed (>= 2.1; Debian/Ubuntu: libjpeg-dev; elsewhere on the compiler's search path, e.g. through CFLAGS and
# LDFLAGS). Optional: where the build fails, pip prints a warning, the install goes on, and the loader decodes
# whole JPEGs with simplejpeg instead (slower).
JPEG_REGION = Extension('dizoo_imgcls.data._jpeg_region', ['dizoo_imgcls/data/_jpeg_region.c'], libraries=['jpeg'],
                        extra_compile_args=['-O2'], optional=True)

setup(
    name='dizoo_imgcls',
    version='0.1.0',
    description='Supervised image classification (ResNet and friends) as a DI-engine plugin',
    packages=find_packages(include=['dizoo_imgcls', 'dizoo_imgcls.*']),
    ext_modules=[JPEG_REGION],
    python_requires='>=3.9',
    install_requires=[
        'DI-engine>=0.5.3,<0.6',
        # torchvision's compiled ops must match torch exactly: 0.27.x is built against torch 2.12.x.
        # Without these pins pip may pick a local CPU-only torch 2.13 wheel that torchvision cannot load on.
        'torch>=2.12,<2.13',
        'torchvision>=0.27,<0.28',
        'timm>=1.0.31,<2',  # models by name (timm/<arch>), Lookahead and LAMB (timm.optim)
        'tensorboardX>=2.6',
        'easydict',
        'numpy',
        'pillow>=10.1',  # ImageFont.load_default(size=) renders the OVERFIT demo's word
        'scikit-learn',  # ships the handwritten-digits images used by --demo
        'simplejpeg>=1.9',  # libjpeg-turbo decoding straight to reduced scale (data loader speed)
        'tqdm>=4.61',  # per-epoch progress bar (tqdm.contrib.logging)
        'psutil',  # peak memory in summary.json, worker memory in benchmarks
        'matplotlib',  # the --lr-find plot (DI-engine installs it too)
        'cleanlab>=2.6',  # ranking of likely label errors (entry/find_label_issues.py)
        # ONNX export (entry/export.py): onnxscript runs torch.onnx's exporter, onnxruntime checks the result.
        # onnx 1.23 needs protobuf>=6, which DI-engine's wandb<=0.19 pin (protobuf<6) rules out.
        'onnx>=1.22,<1.23',
        'onnxscript>=0.7',
        'onnxruntime>=1.32',
    ],
    extras_require={
        # tensorboard: tests read event files and query a live TensorBoard server over HTTP;
        # pytest-xdist: the suite runs in three one-thread processes (pytest.ini); 3.8 for --no-loadscope-reorder
        'test': ['pytest>=7', 'pytest-xdist>=3.8', 'tensorboard>=2.12'],
        # peers: fastai for benchmarks/peers.py (its own Imagenette recipe beside ours); never needed to train
        'peers': ['fastai>=2.7'],
    },
)
