"""The rows of one MMLU subject: what the hub's per-subject config (`dataset_name`) selects."""
import datasets


def world_religions(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.filter(lambda doc: doc["subject"] == "world_religions")
