"""The two steps every file source shares: patterns to distinct paths, paths to open files.

Not composite transforms but functions applying labelled steps inside their caller's
transform: the labels (``MatchFiles``, ``Paths``, ``OncePerFile``, ``ReadMatches``,
``Reshuffle``) stay where they always were in each pipeline's graph (tests/
test_transform_names.py pins them).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io import fileio


def distinct_paths(patterns: beam.PCollection) -> beam.PCollection:
    """Every file the patterns match (local, gs://, s3://; none is no error), each once: a
    file matched by several patterns (a.pcap and *.pcap) is read once."""
    return (
        patterns
        | "MatchFiles" >> fileio.MatchAll(empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | "Paths" >> beam.Map(lambda metadata: metadata.path)
        | "OncePerFile" >> beam.Distinct()
    )


def open_spread(paths: beam.PCollection, suffix: str = "") -> beam.PCollection:
    """The files at ``paths`` as ``ReadableFile``s (directories skipped), spread over the
    workers; ``suffix`` tells apart a second use in the same transform."""
    return (
        paths
        | f"ReadMatches{suffix}" >> fileio.ReadMatches(skip_directories=True)
        | f"Reshuffle{suffix}" >> beam.Reshuffle()
    )
