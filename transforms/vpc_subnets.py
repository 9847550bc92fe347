"""The subnets side input: a ``SubnetMatcher`` every enrichment step reads.

From a static file, or from EC2 DescribeSubnets. In streaming, EC2 is asked again every
``refresh_s`` (Beam's "slowly updating side input" pattern): a ``PeriodicImpulse`` in the
global window drives a DoFn that calls DescribeSubnets; each answer is a whole new matcher
(subnets created or deleted since appear or go), emitted as its own pane of a repeatedly
triggered global window, so ``AsSingleton`` readers see the latest set. A failed refresh is
logged and counted and emits nothing: readers keep the previous set.

AWS credentials and region come the usual boto3 way (environment, profile, instance role);
they are never logged. ``describe_subnets`` is also called once at start-up by the pipeline,
so that missing permissions stop the job before it reads anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import boto3
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import trigger, window
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from botocore.exceptions import BotoCoreError, ClientError

from flowbeam.vpc.subnets import (
    Subnet,
    SubnetMatcher,
    SubnetsError,
    load_subnets,
    subnets_from_describe,
)
from transforms import counters

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ec2Subnets:
    """Where to ask for subnets: the region (None: boto3's default) and an endpoint URL
    (None: AWS's)."""

    region: str | None
    endpoint: str | None
    refresh_s: float


def describe_subnets(source: Ec2Subnets) -> list[Subnet]:
    """Every subnet DescribeSubnets lists (all pages). Raises botocore's errors."""
    # A session of its own: boto3's default one is process-wide state (cached credentials).
    client = boto3.session.Session().client("ec2", region_name=source.region,
                                            endpoint_url=source.endpoint)
    return subnets_from_describe(client.get_paginator("describe_subnets").paginate())


def startup_subnets(subnets_file: str | None, ec2: Ec2Subnets | None) -> list[Subnet]:
    """The subnets at start-up: the file's (any Beam filesystem), or EC2's answer, or none.
    Raises ``SubnetsError`` saying what failed (never a credential)."""
    if subnets_file:
        try:
            with FileSystems.open(subnets_file) as stream:
                text = stream.read().decode("utf-8")
        except (OSError, UnicodeDecodeError, BeamIOError) as error:
            raise SubnetsError(f"cannot read it: {error}") from None
        return load_subnets(subnets_file, text)
    if ec2:
        try:
            return describe_subnets(ec2)
        except (BotoCoreError, ClientError) as error:
            raise SubnetsError(f"DescribeSubnets failed: {error}") from None
    return []


class DescribeSubnetsFn(beam.DoFn):
    """An impulse in, the current subnets (a matcher) out; nothing when EC2 fails."""

    def __init__(self, source: Ec2Subnets) -> None:
        self._source = source
        self._refreshes = counters.counter(counters.VPC_SUBNET_REFRESHES)
        self._failures = counters.counter(counters.VPC_SUBNET_REFRESH_FAILURES)

    def process(self, _: Any) -> Iterator[SubnetMatcher]:
        try:
            subnets = describe_subnets(self._source)
        except (BotoCoreError, ClientError) as error:
            self._failures.inc()
            LOG.warning("flowbeam: DescribeSubnets failed, keeping the previous subnets: %s",
                        type(error).__name__)
            return
        self._refreshes.inc()
        yield SubnetMatcher(subnets)


def subnets_side_input(pipeline: beam.Pipeline, subnets: list[Subnet],
                       ec2: Ec2Subnets | None, streaming: bool) -> beam.pvalue.AsSingleton:
    """The side input: ``subnets`` (a file's, or EC2's at start-up) as they are in batch or
    without EC2; in streaming with ``ec2``, EC2's answer now and at every refresh, ``subnets``
    until the first answer."""
    if ec2 is None or not streaming:
        return beam.pvalue.AsSingleton(
            pipeline | "Subnets" >> beam.Create([SubnetMatcher(subnets)]))
    latest = (
        pipeline
        | "EveryRefresh" >> PeriodicImpulse(
            start_timestamp=time.time(), fire_interval=ec2.refresh_s)
        | "DescribeSubnets" >> beam.ParDo(DescribeSubnetsFn(ec2))
        | "LatestSubnets" >> beam.WindowInto(
            window.GlobalWindows(),
            trigger=trigger.Repeatedly(trigger.AfterCount(1)),
            accumulation_mode=trigger.AccumulationMode.DISCARDING)
    )
    # Until EC2's first answer is in, readers use the start-up set.
    return beam.pvalue.AsSingleton(latest, default_value=SubnetMatcher(subnets))
