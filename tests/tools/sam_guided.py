"""Drives `sam deploy --guided`'s own prompts (SAM CLI's GuidedContext) over
a copy of a template, offline: the answers come from the command line, one
per prompt, and an empty answer is Enter. The only AWS calls of the guided
flow (the managed artifacts bucket, the image repositories) are stubbed.
Prints the transcript, then `--- samconfig.toml ---` and the file written.

usage: sam_guided.py TEMPLATE ANSWER...
"""
import os
import shutil
import sys
import tempfile
from unittest import mock

import click
from click.testing import CliRunner
from samcli.commands.deploy import guided_context
from samcli.commands.deploy.guided_context import GuidedContext

template, answers = sys.argv[1], sys.argv[2:]
work = tempfile.mkdtemp()
copy = os.path.join(work, "template.yaml")
shutil.copy(template, copy)


@click.command("deploy")  # the section SAM writes: [default.deploy.parameters]
def deploy():
    ctx = GuidedContext(
        template_file=copy, stack_name=None, s3_bucket=None, image_repository=None, image_repositories=None,
        s3_prefix=None, region=None, profile=None, confirm_changeset=False, capabilities=None,
        signing_profiles=None, parameter_overrides=None, config_section="parameters", config_env=None,
        config_file=None, disable_rollback=False,
    )
    with mock.patch.object(guided_context, "manage_stack", return_value="stub-managed-bucket"), \
         mock.patch.object(GuidedContext, "prompt_image_repository", return_value={}):
        ctx.run()


os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
result = CliRunner().invoke(deploy, [], input="\n".join(answers) + "\n", catch_exceptions=False)
print(result.output)
print("exit", result.exit_code)
print("--- samconfig.toml ---")
path = os.path.join(work, "samconfig.toml")
print(open(path).read() if os.path.exists(path) else "(none written)")
shutil.rmtree(work)
