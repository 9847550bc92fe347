"""AWS credentials for a flowbeam job on Dataflow, without any AWS secret: boto3's
``credential_process`` of the image (the Dockerfile writes it when built with ``AWS_ROLE_ARN``).

    python aws_credentials.py ROLE_ARN AUDIENCE

Dataflow cannot hand a job environment variables or files, and an AWS access key in a template
parameter would be readable by anyone who can see the job. Instead the job's Google service
account is the identity: the Compute Engine metadata server of the launcher VM and of every
worker signs an ID token for it (audience ``AUDIENCE``), and AWS STS exchanges the token for the
role's temporary credentials (``AssumeRoleWithWebIdentity``, an unsigned call: Google is one
of AWS's built-in web identity providers). The role's trust policy names the service account's
unique id; see the README's "Running on Dataflow". boto3 runs this again before the credentials
expire (after an hour), so a streaming job keeps reading.

Prints the ``credential_process`` JSON (version 1) on stdout; on failure, a one-line reason on
stderr and exit status 1 (boto3 then reports it). The metadata server is
``$GCE_METADATA_HOST`` when set (google-auth's variable; a test server), else Google's.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
SESSION_NAME = "flowbeam-dataflow"
TIMEOUT_S = 10


def google_id_token(audience: str, environ: dict[str, str]) -> str:
    """An ID token of the VM's service account for ``audience`` (``format=full``: it carries
    the account's email, which AWS CloudTrail then shows)."""
    host = environ.get("GCE_METADATA_HOST", "metadata.google.internal")
    query = urllib.parse.urlencode({"audience": audience, "format": "full"})
    request = urllib.request.Request(f"http://{host}{IDENTITY_PATH}?{query}",
                                     headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read().decode("ascii").strip()


def assume_role(role_arn: str, token: str, environ: dict[str, str]) -> dict:
    """The role's temporary credentials in ``credential_process`` form. STS is asked in the
    job's AWS region when the environment names one, else in us-east-1 (any region's STS
    serves every role)."""
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    sts = boto3.session.Session().client("sts", region_name=region,
                                         config=Config(signature_version=UNSIGNED))
    answer = sts.assume_role_with_web_identity(RoleArn=role_arn, RoleSessionName=SESSION_NAME,
                                               WebIdentityToken=token)
    credentials = answer["Credentials"]
    return {"Version": 1, "AccessKeyId": credentials["AccessKeyId"],
            "SecretAccessKey": credentials["SecretAccessKey"],
            "SessionToken": credentials["SessionToken"],
            "Expiration": credentials["Expiration"].isoformat()}


def main(argv: list[str], environ: dict[str, str]) -> int:
    if len(argv) != 2:
        print("usage: aws_credentials.py ROLE_ARN AUDIENCE", file=sys.stderr)
        return 1
    role_arn, audience = argv
    try:
        token = google_id_token(audience, environ)
    except OSError as error:
        print(f"flowbeam: no Google ID token from the metadata server: {error}", file=sys.stderr)
        return 1
    try:
        credentials = assume_role(role_arn, token, environ)
    except (BotoCoreError, ClientError) as error:
        print(f"flowbeam: cannot assume {role_arn}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(credentials))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], dict(os.environ)))
