"""tfscale.data: ImageNet-format TFRecords, the TPU-reference input pipeline and the Fashion-MNIST default.

Reference: Ying et al., "Image Classification at Supercomputer Scale", arXiv:1811.06992 (input pipeline).
"""

from tfscale.data import fashion_mnist
from tfscale.data.padding import pad_eval_batches
from tfscale.data.pipeline import DEFAULT_MAX_PIXELS
from tfscale.data.pipeline import SkippedRecordCounter
from tfscale.data.pipeline import SkippedRecordsLogger
from tfscale.data.pipeline import imagenet_dataset
from tfscale.data.preprocessing import IMAGENET_MEAN_RGB
from tfscale.data.preprocessing import IMAGENET_STDDEV_RGB
from tfscale.data.preprocessing import normalize_images
from tfscale.data.preprocessing import preprocess_for_eval
from tfscale.data.preprocessing import preprocess_for_train
from tfscale.data.preprocessing import preprocess_pixels_for_train
from tfscale.data.preprocessing import preprocess_small_image_for_train
from tfscale.data.preprocessing import to_pixels
from tfscale.data.records import convert_arrays
from tfscale.data.records import convert_image_folder
from tfscale.data.records import count_records
from tfscale.data.records import make_example
from tfscale.data.records import read_metadata
from tfscale.data.records import write_sharded_records
from tfscale.data.service import LocalDataService
from tfscale.data.service import start_worker
from tfscale.data.tfds_source import convert_tfds
from tfscale.data.tfds_source import tfds_dataset
from tfscale.data.tfds_source import tfds_info

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STDDEV_RGB",
    "LocalDataService",
    "SkippedRecordCounter",
    "SkippedRecordsLogger",
    "convert_arrays",
    "convert_image_folder",
    "convert_tfds",
    "count_records",
    "fashion_mnist",
    "imagenet_dataset",
    "make_example",
    "normalize_images",
    "pad_eval_batches",
    "preprocess_for_eval",
    "preprocess_for_train",
    "preprocess_pixels_for_train",
    "preprocess_small_image_for_train",
    "read_metadata",
    "start_worker",
    "tfds_dataset",
    "tfds_info",
    "to_pixels",
    "write_sharded_records",
]
