"""Training the completion network the paper's way (three phases, the context
discriminator), resumable, on one device or several (torchrun).

- ``config``: the run's settings (``TrainConfig``), ``TrainingError``;
- ``trainer``: ``Trainer``, both nets and optimisers, one step of a phase;
- ``run``: ``train`` and ``resume_run``, a run step by step;
- ``run_folder``: the run folder's files, and a new run or the resume of the one there;
- ``checkpoints``, ``run_log``: what the run writes there;
- ``init_weights``: a run that starts from weights users hold (``--init``);
- ``data``, ``distributed``: the training data (the paper's rectangles, free-form
  holes); several processes.
"""

from glcic_fast.training.config import TrainConfig, TrainingError
from glcic_fast.training.run import resume_run, train
from glcic_fast.training.trainer import Trainer

__all__ = ["TrainConfig", "TrainingError", "Trainer", "resume_run", "train"]
