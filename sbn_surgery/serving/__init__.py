"""Serving an exported file without torch or timm: onnxruntime, numpy and Pillow only.

* :mod:`.metadata`: the file's eval preprocessing (timm's data config) and class names, checked;
* :mod:`.preprocess`: timm's eval transform (``create_transform(**data_config)``) in PIL and
  numpy;
* :mod:`.runtime`: :class:`ServingModel`, one onnxruntime session with its checked input,
  batched logits, softmax and top-k;
* :mod:`.predict`: top-k on image files and folders;
* :mod:`.evaluate`: top-1/top-5, speed and agreement of models on labelled images (a labelled
  folder is read here; the training data sources live in ``sbn_surgery.accuracy``);
* :mod:`.quantize`: onnxruntime static int8 quantization (it needs the onnx package).

Nothing here imports torch or timm (``tests/test_architecture.py`` checks it from the source,
and a test runs ``sbn-surgery predict`` where importing them fails).
"""

from .evaluate import EvalReport, Samples, Score, evaluate, labelled_folder
from .metadata import DataConfig, ServingInfo, check_classes, check_data_config
from .predict import Prediction, Predictions, list_images, predict
from .preprocess import EvalTransform
from .runtime import ServingModel, open_session, softmax, top_k

__all__ = ["DataConfig", "ServingInfo", "check_classes", "check_data_config", "EvalTransform",
           "ServingModel", "open_session", "softmax", "top_k", "Prediction", "Predictions",
           "list_images", "predict", "EvalReport", "Samples", "Score", "evaluate",
           "labelled_folder"]
