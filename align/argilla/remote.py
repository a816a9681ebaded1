"""Datasets on the server: find, create or check one, and read its records with every response.

Records are read from the REST endpoint ``GET /api/v1/datasets/{id}/records``
rather than through the SDK's record iterator, because the SDK turns a
ranking answer into a plain list and drops its ranks (ties included); the
endpoint returns every annotator's response with ranks and timestamps.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from align import extras
from align.argilla.schema import differences
from align.errors import AlignError

if TYPE_CHECKING:
    import argilla as rg

_PAGE = 1000  # the endpoint's largest page


class DatasetMismatch(AlignError):
    """The dataset exists with other fields or questions than this push needs."""


def find_dataset(client: rg.Argilla, name: str, workspace: str | None = None) -> rg.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not found" and "using default workspace" are answers, not warnings
        return client.datasets(name=name, workspace=workspace)


def require_dataset(client: rg.Argilla, name: str, workspace: str | None = None) -> rg.Dataset:
    dataset = find_dataset(client, name, workspace)
    if dataset is None:
        names = sorted(d.name for d in client.datasets)
        raise AlignError(f"no dataset '{name}' on {client.api_url}" + (f" (there are: {', '.join(names)})"
                                                                       if names else " (it has no datasets yet)"))
    return dataset


def ensure_dataset(client: rg.Argilla, name: str, settings: rg.Settings, *, workspace: str | None = None,
                   force: bool = False, update: Collection[str] = ("guidelines", "min_submitted")
                   ) -> tuple[rg.Dataset, list[str]]:
    """The dataset, created if missing. Returns it and notes on what was done to it.

    An existing dataset with other fields or questions is refused (answers to
    other questions cannot be mixed), unless ``force``: then it is deleted with
    its responses and created again. The settings named in ``update``
    (``guidelines``, ``min_submitted``) are updated in place; others are kept.
    """
    existing = find_dataset(client, name, workspace)
    notes: list[str] = []
    if existing is not None:
        diff = differences(settings, existing.settings)
        if diff and not force:
            raise DatasetMismatch(
                f"dataset '{name}' on {client.api_url} exists with other questions:\n"
                + "\n".join(f"  {line}" for line in diff)
                + f"\npush to another --dataset, or add --force to delete '{name}' (and its responses) and create "
                  "it again")
        if diff:
            existing.delete()
            notes.append(f"deleted '{name}' (--force): " + "; ".join(diff))
        else:
            notes.extend(_update_in_place(existing, settings, update))
            return existing, notes
    rg = extras.argilla()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = rg.Dataset(name=name, settings=settings, workspace=workspace, client=client).create()
    notes.append(f"created dataset '{name}'")
    return dataset, notes


def _update_in_place(dataset: rg.Dataset, settings: rg.Settings, update: Collection[str]) -> list[str]:
    notes = []
    current = dataset.settings
    if "guidelines" in update and current.guidelines != settings.guidelines:
        current.guidelines = settings.guidelines
        notes.append("updated the guidelines")
    if "min_submitted" in update and current.distribution.min_submitted != settings.distribution.min_submitted:
        notes.append(f"min_submitted {current.distribution.min_submitted} -> {settings.distribution.min_submitted}")
        current.distribution = settings.distribution
    if notes:
        extras.argilla()
        from argilla._exceptions import ArgillaError

        try:
            dataset.update()
        except ArgillaError as exc:  # e.g. the distribution of a dataset that already has answers
            return [f"kept the dataset's settings (could not update {', '.join(notes)}: {exc})"]
    return notes


def iter_records(client: rg.Argilla, dataset: rg.Dataset, *, include: str = "responses,suggestions"
                 ) -> Iterator[dict[str, Any]]:
    """Every record as the REST API returns it, oldest first, with all users' responses."""
    offset = 0
    while True:
        params: dict[str, Any] = {"offset": offset, "limit": _PAGE}
        if include:
            params["include"] = include
        response = client.api.http_client.get(f"/api/v1/datasets/{dataset.id}/records", params=params)
        response.raise_for_status()
        page = response.json()
        yield from page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return


def external_ids(client: rg.Argilla, dataset: rg.Dataset) -> list[str]:
    """The ids align gave the records (the SDK's ``Record.id``), in server order."""
    return [r["external_id"] for r in iter_records(client, dataset, include="")]


def question_names(dataset: rg.Dataset) -> dict[str, str]:
    """Question id -> name (suggestions come back with ids only)."""
    return {str(q.id): q.name for q in dataset.settings.questions}


def usernames(client: rg.Argilla) -> dict[str, str]:
    return {str(u.id): u.username for u in client.users}
