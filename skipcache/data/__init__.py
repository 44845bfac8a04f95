"""Datasets: the contract (`base`), the registry of layouts (`registry`), protocols (`splits`).

`get_dataset(name, data_root)` lists a dataset's classes and splits without opening images;
`build_task(dataset, shots=..., seed=..., classes="base" | "all")` turns it into the train and
test splits of a protocol.
"""

from skipcache.data.base import Dataset, Example, load_image
from skipcache.data.registry import DatasetInfo, get_dataset, list_datasets
from skipcache.data.splits import Task, TaskSplit, build_task

__all__ = [
    "Dataset",
    "DatasetInfo",
    "Example",
    "Task",
    "TaskSplit",
    "build_task",
    "get_dataset",
    "list_datasets",
    "load_image",
]
