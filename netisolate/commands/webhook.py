"""`netisolate webhook`: the validating admission webhook server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from netisolate.commands.common import add_command, seconds
from netisolate.config import load_config
from netisolate.kube import WebhookApi, api_client
from netisolate.logs import setup_logging
from netisolate.model import InputError
from netisolate.webhook import tls
from netisolate.webhook.review import PATHS
from netisolate.webhook.server import (
    LabelLookup,
    Limits,
    NamespaceLabels,
    NamespaceUnavailableError,
    build_app,
)

log = logging.getLogger("netisolate.webhook")
DETAILS = f"""\
Serves HTTPS on --listen at the paths of daemonset/'s ValidatingWebhookConfiguration:
{chr(10).join(f"  {path}" for path in PATHS)}
plus /healthz and /metrics. Given --tls-cert-file/--tls-key-file it serves those and reloads them
when they change (cert-manager, a rotated Secret). Without them it bootstraps: it reads (or, first
writer wins, creates) the Secret {{namespace}}/netisolate-webhook-tls and patches the caBundle of the
`netisolate` ValidatingWebhookConfiguration — and no other. Pods are judged with their namespace's
isolation label, read from the API server; when it cannot be read the pod is denied (fail closed).
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "webhook", "run the validating admission webhook", DETAILS)
    parser.add_argument("--listen", default="0.0.0.0:8443", metavar="ADDR:PORT")
    parser.add_argument("--tls-cert-file", metavar="FILE")
    parser.add_argument("--tls-key-file", metavar="FILE")
    parser.add_argument("--config", metavar="FILE", help="admission config (default: built-in defaults)")
    parser.add_argument("--kubeconfig", metavar="FILE", help="default: in-cluster configuration")
    parser.add_argument(
        "--no-bootstrap-tls",
        action="store_true",
        help="never create certificates (cert-manager provides them); then the files are required",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "netisolate-system"),
        help="where the TLS Secret lives (default: $POD_NAMESPACE or netisolate-system)",
    )
    parser.add_argument("--secret", default="netisolate-webhook-tls")
    parser.add_argument("--service", default="netisolate-webhook")
    parser.add_argument("--webhook-configuration", default="netisolate")
    limits = Limits()
    parser.add_argument(
        "--review-workers",
        type=_count,
        default=limits.workers,
        metavar="N",
        help=f"processes judging reviews, one review each at a time (default {limits.workers})",
    )
    parser.add_argument(
        "--review-timeout",
        type=seconds,
        default=limits.seconds,
        metavar="SECONDS",
        help="a review not judged by then is denied with the reason, its worker replaced; keep it "
        f"below the webhook configuration's timeoutSeconds (default {limits.seconds:g})",
    )
    parser.add_argument(
        "--review-memory",
        type=_count,
        default=limits.memory_mib,
        metavar="MIB",
        help="memory one review may use on top of an idle worker; a review needing more is denied "
        f"(default {limits.memory_mib})",
    )
    parser.set_defaults(run=run)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number above 0")
    return int(text)


def _cert_files(args: argparse.Namespace, api: WebhookApi | None) -> tuple[str, str, bytes | None]:
    """The serving certificate's files, and the CA to keep in our configuration when we made it."""
    if args.tls_cert_file and args.tls_key_file:
        return args.tls_cert_file, args.tls_key_file, None
    if args.no_bootstrap_tls:
        raise InputError("--no-bootstrap-tls needs --tls-cert-file and --tls-key-file")
    assert api is not None  # serve() re-raises missing credentials when no files are given
    bundle = tls.bootstrap(
        api,
        api,
        namespace=args.namespace,
        secret=args.secret,
        service=args.service,
        webhook_config=args.webhook_configuration,
    )
    files = tls.write_files(bundle, Path(tempfile.mkdtemp(prefix="netisolate-tls-")))
    return *files, bundle.ca_pem


def _unreadable(reason: str) -> LabelLookup:
    async def lookup(namespace: str) -> Mapping[str, str]:
        raise NamespaceUnavailableError(f"cannot read namespace {namespace}: {reason}")

    return lookup


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    api: WebhookApi | None = None
    try:
        api = api_client(args.kubeconfig, "netisolate-webhook")
        labels: LabelLookup = NamespaceLabels(api)
    except InputError as err:
        if not (args.tls_cert_file and args.tls_key_file):
            raise
        # Serving needs no cluster; judging a pod needs its namespace's label: deny until it can be read.
        log.warning(
            "no cluster access: pods will be denied until namespaces can be read", extra={"error": str(err)}
        )
        labels = _unreadable(str(err))
    cert_file, key_file, ca = _cert_files(args, api)
    cert = tls.ReloadingCert(cert_file, key_file)
    limits = Limits(args.review_workers, args.review_timeout, args.review_memory)
    app = build_app(load_config(args.config), labels, limits)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host or "0.0.0.0", int(port), ssl_context=cert.context).start()
    log.info("webhook serving", extra={"listen": args.listen, "paths": list(PATHS)})
    keep = [] if ca is None or api is None else [tls.keep_ca_bundle(api, args.webhook_configuration, ca)]
    await asyncio.gather(cert.watch(), *keep)


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        asyncio.run(serve(args))
    except tls.CertificateError as err:
        log.error("cannot serve", extra={"error": str(err)})
        print(f"netisolate webhook: {err}", file=sys.stderr)
        return 1
    return 0
