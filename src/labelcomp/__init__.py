"""labelcomp: k-fold fine-tuning of timm backbones for image-classification competitions.

Modules follow the flow config -> competition -> folds -> train -> predict -> submit -> history.
"""

__version__ = "0.1.0"
