"""crossflow: self-supervised image representations from video, with optical flow as the teacher."""

__version__ = "0.1.0"
