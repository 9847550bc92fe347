"""Streaming jobs are updated in place (``--update``): Dataflow maps the running job's state to
the new graph by transform name, so a renamed transform loses its state (open flows) or stops
the update. The pcap pipeline's graph (the same transforms the streaming pipelines reuse) is
pinned here, every label at every depth: renaming one must be a decision, made by updating this
list, not an accident."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.testing import test_pipeline

from pipelines.pcap_flows import build, parse_config
from transforms.bigquery_config import STREAMING_INSERTS, BigQueryConfig, TableRef

# The graph with both sinks: Parquet and BigQuery (streaming inserts, merged from a staging
# table), so that every flowbeam transform appears. Beam's own labels inside its transforms
# are pinned too: Dataflow matches them the same way.
PCAP_FLOWS_LABELS = """
Patterns
Patterns/Impulse
Patterns/FlatMap(<lambda at core.py:4094>)
Patterns/MaybeReshuffle
Patterns/Map(decode)
DecodeCaptures
DecodeCaptures/MatchFiles
DecodeCaptures/MatchFiles/ParDo(_MatchAllFn)
DecodeCaptures/Paths
DecodeCaptures/OncePerFile
DecodeCaptures/OncePerFile/ToPairs
DecodeCaptures/OncePerFile/Group
DecodeCaptures/OncePerFile/Group/GroupByKey
DecodeCaptures/OncePerFile/Group/Combine
DecodeCaptures/OncePerFile/Group/Combine/ParDo(CombineValuesDoFn)
DecodeCaptures/OncePerFile/Distinct
DecodeCaptures/OncePerFile/Distinct/Keys
DecodeCaptures/PlanRanges
DecodeCaptures/PlanRanges/ParDo(PlanRangesFn)
DecodeCaptures/ReadMatches
DecodeCaptures/ReadMatches/ParDo(_ReadMatchesFn)
DecodeCaptures/Reshuffle
DecodeCaptures/Reshuffle/AddRandomKeys
DecodeCaptures/Reshuffle/ReshufflePerKey
DecodeCaptures/Reshuffle/ReshufflePerKey/Map(reify_metadata_default_window)
DecodeCaptures/Reshuffle/ReshufflePerKey/GroupByKey
DecodeCaptures/Reshuffle/ReshufflePerKey/FlatMap(restore_metadata_default_window)
DecodeCaptures/Reshuffle/RemoveRandomKeys
DecodeCaptures/DecodeFiles
DecodeCaptures/DecodeFiles/ParDo(_DecodeCaptureFileFn)
DecodeCaptures/ReshuffleRanges
DecodeCaptures/ReshuffleRanges/AddRandomKeys
DecodeCaptures/ReshuffleRanges/ReshufflePerKey
DecodeCaptures/ReshuffleRanges/ReshufflePerKey/Map(reify_metadata_default_window)
DecodeCaptures/ReshuffleRanges/ReshufflePerKey/GroupByKey
DecodeCaptures/ReshuffleRanges/ReshufflePerKey/FlatMap(restore_metadata_default_window)
DecodeCaptures/ReshuffleRanges/RemoveRandomKeys
DecodeCaptures/DecodeRanges
DecodeCaptures/DecodeRanges/ParDo(DecodeRangeFn)
DecodeCaptures/GroupRanges
DecodeCaptures/SettleRanges
DecodeCaptures/SettleRanges/ParDo(SettleRangesFn)
DecodeCaptures/KeepSettledRanges
DecodeCaptures/ReadMatchesAgain
DecodeCaptures/ReadMatchesAgain/ParDo(_ReadMatchesFn)
DecodeCaptures/ReshuffleAgain
DecodeCaptures/ReshuffleAgain/AddRandomKeys
DecodeCaptures/ReshuffleAgain/ReshufflePerKey
DecodeCaptures/ReshuffleAgain/ReshufflePerKey/Map(reify_metadata_default_window)
DecodeCaptures/ReshuffleAgain/ReshufflePerKey/GroupByKey
DecodeCaptures/ReshuffleAgain/ReshufflePerKey/FlatMap(restore_metadata_default_window)
DecodeCaptures/ReshuffleAgain/RemoveRandomKeys
DecodeCaptures/DecodeFilesAgain
DecodeCaptures/DecodeFilesAgain/ParDo(_DecodeCaptureFileFn)
DecodeCaptures/AllFragments
DecodeCaptures/CaptureDeadLetters
BuildFlows
BuildFlows/ShardFragments
BuildFlows/MergeFragments
BuildFlows/MergeFragments/GroupByShard
BuildFlows/MergeFragments/MergeShard
StartupDeadLetters
StartupDeadLetters/Impulse
StartupDeadLetters/FlatMap(<lambda at core.py:4094>)
StartupDeadLetters/MaybeReshuffle
StartupDeadLetters/Map(decode)
InputDeadLetters
WriteFlowsToBigQuery
WriteFlowsToBigQuery/ToBigQueryRows
WriteFlowsToBigQuery/WriteToBigQuery
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/AppendDestination
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/AddInsertIds
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/ToHashableTableRef
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/WithFixedSharding
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/CommitInsertIds
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/CommitInsertIds/Map(reify_metadata_default_window)
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/CommitInsertIds/GroupByKey
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/CommitInsertIds/FlatMap(restore_metadata_default_window)
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/DropShard
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/FromHashableTableRef
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/StreamInsertRows
WriteFlowsToBigQuery/WriteToBigQuery/_StreamToBigQuery/StreamInsertRows/ParDo(BigQueryWriteFn)
WriteFlowsToBigQuery/MergeStagedRows
WriteFlowsToBigQuery/MergeStagedRows/Once
WriteFlowsToBigQuery/MergeStagedRows/Once/Impulse
WriteFlowsToBigQuery/MergeStagedRows/Once/FlatMap(<lambda at core.py:4094>)
WriteFlowsToBigQuery/MergeStagedRows/Once/MaybeReshuffle
WriteFlowsToBigQuery/MergeStagedRows/Once/Map(decode)
WriteFlowsToBigQuery/MergeStagedRows/Merge
WriteFlowsToBigQuery/ToDeadLetters
WriteFlowsToBigQuery/WriteErrorsTable
WriteFlowsToBigQuery/WriteErrorsTable/ToErrorRows
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/AppendDestination
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/AddInsertIds
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/ToHashableTableRef
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/WithFixedSharding
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/CommitInsertIds
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/CommitInsertIds/Map(reify_metadata_default_window)
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/CommitInsertIds/GroupByKey
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/CommitInsertIds/FlatMap(restore_metadata_default_window)
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/DropShard
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/FromHashableTableRef
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/StreamInsertRows
WriteFlowsToBigQuery/WriteErrorsTable/InsertErrorRows/_StreamToBigQuery/StreamInsertRows/ParDo(BigQueryWriteFn)
WriteFlowsToBigQuery/WriteErrorsTable/LogRefused
AllDeadLetters
CountDeadLetters
WriteFlows
WriteFlows/BatchRows
WriteFlows/BatchRows/ParDo(_GlobalWindowsBatchingDoFn)
WriteFlows/ToArrow
WriteFlows/WriteParquet
WriteFlows/WriteParquet/Write
WriteFlows/WriteParquet/Write/WriteImpl
WriteFlows/WriteParquet/Write/WriteImpl/DoOnce
WriteFlows/WriteParquet/Write/WriteImpl/DoOnce/Impulse
WriteFlows/WriteParquet/Write/WriteImpl/DoOnce/FlatMap(<lambda at core.py:4094>)
WriteFlows/WriteParquet/Write/WriteImpl/DoOnce/MaybeReshuffle
WriteFlows/WriteParquet/Write/WriteImpl/DoOnce/Map(decode)
WriteFlows/WriteParquet/Write/WriteImpl/InitializeWrite
WriteFlows/WriteParquet/Write/WriteImpl/WindowInto(WindowIntoFn)
WriteFlows/WriteParquet/Write/WriteImpl/WriteBundles
WriteFlows/WriteParquet/Write/WriteImpl/Pair
WriteFlows/WriteParquet/Write/WriteImpl/GroupByKey
WriteFlows/WriteParquet/Write/WriteImpl/Extract
WriteFlows/WriteParquet/Write/WriteImpl/PreFinalize
WriteFlows/WriteParquet/Write/WriteImpl/FinalizeWrite
WriteDeadLetters
WriteDeadLetters/ToJsonLines
WriteDeadLetters/WriteJsonLines
WriteDeadLetters/WriteJsonLines/Write
WriteDeadLetters/WriteJsonLines/Write/WriteImpl
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/DoOnce
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/DoOnce/Impulse
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/DoOnce/FlatMap(<lambda at core.py:4094>)
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/DoOnce/MaybeReshuffle
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/DoOnce/Map(decode)
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/InitializeWrite
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/WindowInto(WindowIntoFn)
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/WriteBundles
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/Pair
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/GroupByKey
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/Extract
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/PreFinalize
WriteDeadLetters/WriteJsonLines/Write/WriteImpl/FinalizeWrite
""".strip().splitlines()


class _Labels(PipelineVisitor):
    def __init__(self) -> None:
        self.labels: list[str] = []

    def enter_composite_transform(self, node) -> None:
        if node.full_label:  # the root has none
            self.labels.append(node.full_label)

    def visit_transform(self, node) -> None:
        self.labels.append(node.full_label)


def test_the_pcap_pipeline_keeps_its_transform_names():
    options = PipelineOptions(["--input", "/captures/a.pcap", "--output", "/flows"])
    table = TableRef("proj", "network", "flow_logs")
    pipeline = test_pipeline.TestPipeline(options=options)
    build(pipeline, parse_config(options, to_bigquery=True), (),
          BigQueryConfig(table, STREAMING_INSERTS), TableRef("proj", "network", "staging"))
    visitor = _Labels()
    pipeline.visit(visitor)
    assert visitor.labels == PCAP_FLOWS_LABELS
