#!/usr/bin/env bash
# Build and push flowbeam's Dataflow images and flex templates from one place (`make templates`):
#
#   REPOSITORY=europe-west1-docker.pkg.dev/my-project/flowbeam BUCKET=gs://my-bucket \
#       [AWS_ROLE_ARN=arn:aws:iam::123456789012:role/flowbeam-dataflow] templates/build.sh [TAG]
#
# For every pipeline with a templates/<pipeline>/metadata.json: an image
# (REPOSITORY/flowbeam-<pipeline>:TAG, TAG defaulting to the commit; all of them from one
# Cloud Build of templates/Dockerfile, sharing every layer but the pipeline's name) and the
# flex template BUCKET/templates/<pipeline>.json that launches it. AWS_ROLE_ARN: the AWS role
# the jobs assume for s3://, Kinesis and EC2 (templates/aws_credentials.py); no AWS secret is
# ever built in or passed. Needs an authenticated gcloud, with the Cloud Build, Artifact
# Registry and Dataflow APIs enabled; flowbeam's wheel is built from the committed tree with
# the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${REPOSITORY:?set REPOSITORY, e.g. europe-west1-docker.pkg.dev/PROJECT/flowbeam}"
: "${BUCKET:?set BUCKET, e.g. gs://my-bucket (templates go to BUCKET/templates/)}"
TAG="${1:-$(git rev-parse --short HEAD)}"
PYTHON="${PYTHON:-.venv/bin/python}"

pipelines=()
for metadata in templates/*/metadata.json; do
    pipelines+=("$(basename "$(dirname "$metadata")")")
done

# The wheel from a clean export of the commit: no local edits, no stale setuptools build/.
source_dir="$(mktemp -d)"
trap 'rm -rf "$source_dir"' EXIT
git archive HEAD | tar -x -C "$source_dir"
rm -rf templates/dist
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir templates/dist "$source_dir"

gcloud builds submit templates --config templates/cloudbuild.yaml --substitutions \
    "_REPOSITORY=$REPOSITORY,_TAG=$TAG,_PIPELINES=${pipelines[*]},_AWS_ROLE_ARN=${AWS_ROLE_ARN:-}"

for pipeline in "${pipelines[@]}"; do
    image="$REPOSITORY/flowbeam-$pipeline:$TAG"
    gcloud dataflow flex-template build "$BUCKET/templates/$pipeline.json" \
        --image "$image" --sdk-language PYTHON --metadata-file "templates/$pipeline/metadata.json"
    echo "flowbeam: $BUCKET/templates/$pipeline.json launches $image"
done
