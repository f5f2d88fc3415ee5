"""Data: the datasets the experiments load (`datasets`) and own image folders (`folder`).

* `datasets`: tfds / Fashion-MNIST IDX (`idx`) / npz (`npz`) sources -> a `Dataset` of uint8
  images, in memory, except an uncompressed npz's images: memory-mapped (`stream.RowView`).
* `folder`: a folder of PNG/JPEG images and a labels CSV (`jax-seqgcn select --images`).
"""

from jax_seqgcn.data.datasets import DATASETS
from jax_seqgcn.data.datasets import SOURCES
from jax_seqgcn.data.datasets import Dataset
from jax_seqgcn.data.datasets import DatasetNotFoundError
from jax_seqgcn.data.datasets import describe
from jax_seqgcn.data.datasets import load_dataset
from jax_seqgcn.data.datasets import load_npz
from jax_seqgcn.data.datasets import load_tfds
from jax_seqgcn.data.idx import load_fashion_mnist_idx
