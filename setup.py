from setuptools import find_packages, setup

setup(
    name='dizoo_imgcls',
    version='0.1.0',
    description='Supervised image classification (ResNet and friends) as a DI-engine plugin',
    packages=find_packages(include=['dizoo_imgcls', 'dizoo_imgcls.*']),
    python_requires='>=3.9',
    install_requires=[
        'DI-engine>=0.5.3,<0.6',
        # torchvision's compiled ops must match torch exactly: 0.27.x is built against torch 2.12.x.
        # Without these pins pip may pick a local CPU-only torch 2.13 wheel that torchvision cannot load on.
        'torch>=2.12,<2.13',
        'torchvision>=0.27,<0.28',
        'tensorboardX>=2.6',
        'easydict',
        'numpy',
        'pillow',
        'scikit-learn',  # ships the handwritten-digits images used by --demo
    ],
    extras_require={
        'test': ['pytest>=7', 'tensorboard>=2.12'],
    },
)
