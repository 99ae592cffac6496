"""The `fljob` command line.

Start-up matters: `fljob validate/render/schema` import only the spec and the renderers (no
torch, no submitit). Every subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from fljob import __version__
from fljob.backends.base import BACKEND_NAMES
from fljob.errors import JobFailed, UsageError
from fljob.exitcodes import USAGE

EPILOG = """\
a spec is one YAML file; every field has a default except `name`:

  name: tiny-mup
  training: {steps: 50}
  optimizer: {name: adopt, lr: 0.003}

examples:
  fljob validate spec.yaml                          check a spec; errors name line:col and field
  fljob render --backend slurm spec.yaml -o out/    the exact sbatch script, and the spec beside it
  fljob render --backend k8s spec.yaml -o out/      PyTorchJob + ConfigMap + Service + PodMonitor
  fljob submit --backend local spec.yaml            train on this machine (CPU or GPU)
  fljob submit --backend slurm spec.yaml --set training.steps=100
  fljob status slurm://1234 ; fljob logs -f slurm://1234 ; fljob cancel slurm://1234
  fljob schema > fljob.schema.json                  JSON Schema for your editor
  fljob dashboard -o grafana/                       Grafana dashboard JSON, ConfigMap, provisioning
  fljob data prepare builtin:pydoc s3://bucket/pydoc   tokenized MDS shards to train from

sweeps: a spec with a `sweep:` block is a grid of trials (every combination of the values):
  sweep: {grid: {model.width: [128, 256, 512], optimizer.lr: [0.001, 0.002, 0.004]}, parallel: 4}
  fljob submit --backend local sweep.yaml           the trials on this machine, `parallel` at a time
  fljob render --backend slurm sweep.yaml -o out/   one array job (--array=0-8%4) and a trials file
  fljob status local://runs/<sweep name>            a table of trials: state, step, losses
  fljob sweep report runs/<sweep name> -o report/   optimum per width, transfer.png, best.yaml

exit codes: 0 ok, 1 failure, 2 bad input (the message says which field and how to fix it),
3 the loss or gradient norm became NaN/inf (nothing of it was committed), 75 the trainer
checkpointed and asks to be requeued.
"""


def _add_spec_args(p: argparse.ArgumentParser, site: bool = True, required: bool = True) -> None:
    p.add_argument("spec", type=Path, nargs=None if required else "?",
                   help="job spec (YAML)" if required else "job spec (YAML, optional)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set training.steps=100 (repeatable; VALUE is YAML)")
    if site:
        p.add_argument("--site", type=Path, default=os.environ.get("FLJOB_SITE") or None, metavar="PROFILE",
                       help="site profile: a partial spec of the cluster's defaults (partition, account, "
                            "mounts, storage) that the spec is laid over; default $FLJOB_SITE "
                            "(see slurm/site-profile.yaml)")


def _add_backend_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--backend", "-b", choices=BACKEND_NAMES, default=default, required=default is None,
                   help="where the job runs" + (f" (default: {default})" if default else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fljob",
        description="One validated job spec for muP LLM pretraining on torchtitan, "
                    "rendered for SLURM, Kubernetes or this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fljob {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec; exit 2 with every problem, each with line:col and a fix")
    _add_spec_args(p)
    p.add_argument("--backend", "-b", choices=BACKEND_NAMES,
                   help="also run every check that render, submit and the trainer would run for this "
                        "backend (a sweep: for every trial)")
    p.add_argument("--print", dest="print_spec", action="store_true", help="print the resolved spec")

    p = sub.add_parser("render", help="write the exact artifacts a submit would send, without sending them")
    _add_spec_args(p)
    _add_backend_arg(p)
    p.add_argument("-o", "--output", type=Path,
                   help="folder to write into (default: the spec's run_dir); '-' prints to stdout")
    p.add_argument("--doctor", action="store_true",
                   help="render a job that only runs the distributed preflight (rendezvous + all-reduce)")

    p = sub.add_parser("schema", help="print the JSON Schema of the job spec (for editors)")

    p = sub.add_parser("submit", help="render and submit; prints a handle for status/logs/cancel")
    _add_spec_args(p)
    _add_backend_arg(p, default="local")
    p.add_argument("--doctor", action="store_true",
                   help="run the distributed preflight instead of training: every rank joins the process "
                        "group through the real rendezvous and all-reduces")
    p.add_argument("--dry-run", action="store_true",
                   help="show the files submit would write and the command it would run; write and run nothing")

    p = sub.add_parser("status", help="show a job's state (a sweep: a table of its trials)",
                       description="The same form for every backend: `<handle> <STATE> key=value ...`, STATE "
                                   "one of PENDING RUNNING REQUEUED COMPLETED FAILED CANCELLED PREEMPTED "
                                   "DIVERGED UNKNOWN (native= keeps the cluster's own word). A sweep prints "
                                   "a head line and one row per trial.")
    p.add_argument("handle", help="slurm://<jobid>, k8s://<namespace>/<name> or local://<run dir>")
    p.add_argument("--json", action="store_true", help="print the status as JSON, for scripts")
    p = sub.add_parser("cancel", help="stop a job (the trainer checkpoints first where the backend allows)")
    p.add_argument("handle", help="slurm://<jobid>, k8s://<namespace>/<name> or local://<run dir>")
    p = sub.add_parser("logs", help="print a job's output")
    p.add_argument("handle", help="slurm://<jobid>, k8s://<namespace>/<name> or local://<run dir>")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the job writes")

    p = sub.add_parser("train", help="the container entrypoint: train from a spec (started by torchrun)")
    _add_spec_args(p, site=False)  # the shipped spec is resolved: the site profile is in it

    sub.add_parser(
        "launch", add_help=False,
        help="torchrun that keeps the trainer's exit code and forwards the pre-kill signal to it "
             "(takes torchrun's arguments: fljob launch --nproc-per-node=2 -- train spec.yaml)",
    )

    p = sub.add_parser(
        "doctor", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="preflight before queueing: tools, partition limits, S3 buckets, Kubeflow CRDs",
        description="Ask the real cluster and storage whether the spec can run, before it waits in a "
                    "queue: each check prints PASS, FAIL with a fix, or SKIP with why. Exit 1 when "
                    "any check failed, 2 for a bad spec.",
        epilog="checks by backend:\n"
               "  slurm  sbatch/srun/sacct on PATH; pyxis (srun --help lists --container-image) or\n"
               "         apptainer per slurm.container.runtime; the partition exists, is UP and its\n"
               "         MaxTime/MaxNodes admit slurm.time and resources.nodes\n"
               "  k8s    kubectl on PATH; when a cluster answers, the PyTorchJob (and, with the\n"
               "         pod monitor on, the PodMonitor) CRDs are installed and serve v1\n"
               "  local  torch and torchtitan importable\n"
               "  all    every s3:// bucket of data.streams and checkpoint.uri answers HEAD with\n"
               "         the spec's storage endpoint and referenced credentials (never printed)\n"
               "examples:\n"
               "  fljob doctor --backend slurm spec.yaml\n"
               "  fljob launch --nproc-per-node=2 -- doctor --distributed   (rendezvous + all-reduce)",
    )
    _add_spec_args(p, required=False)
    _add_backend_arg(p, default="local")
    p.add_argument("--distributed", action="store_true",
                   help="run under torchrun/fljob launch: report rank, world size and an all-reduce result")

    _add_data_parser(sub)
    _add_dashboard_parser(sub)
    _add_mup_parser(sub)
    _add_sweep_parser(sub)
    _add_hf_parsers(sub)
    return parser


DASHBOARD_EPILOG = """\
writes three files into the folder, all or none (a folder that cannot take them: one line
naming the path and the cause, exit 2):
  fljob-training.json                   the dashboard (import it, or let provisioning load it)
  fljob-dashboard.configmap.yaml        the same JSON in a ConfigMap labelled
                                        grafana_dashboard: "1" (kube-prometheus-stack's Grafana
                                        sidecar loads it): kubectl apply -f it
  fljob-dashboards.provisioning.yaml    a Grafana file provider: copy it to
                                        provisioning/dashboards/ and the JSON to
                                        /var/lib/grafana/dashboards/fljob/

panels: loss, held-out loss, learning rate per muP group, gradient norm, tokens/s, MFU,
step time p50/p95, optimizer statistics per group, data wait, checkpoint age/duration/size,
device memory;
variables: datasource, job, run_id (the labels every fljob_ series carries).
configs/grafana/ holds the output of this command for the current fljob.

examples:
  fljob dashboard -o grafana/
  fljob dashboard -o grafana/ --namespace monitoring
"""


def _add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="write the Grafana dashboard JSON, its ConfigMap and provisioning file",
                       description="Write fljob's Grafana training dashboard (generated from code).",
                       epilog=DASHBOARD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("."),
                   help="folder to write into (created if missing; default: the current folder)")
    p.add_argument("--namespace", help="namespace of the ConfigMap (default: none, kubectl's current)")


MUP_COORD_CHECK_EPILOG = """\
what it does: builds the spec's model (default: the tiny flavor) at every --widths, in muP
and in the standard parametrisation (SP, model.mup: false), with the same base learning rate;
trains each --steps steps of the spec's optimizer on the bundled text, once per seed; and
records, in every forward pass, the mean |activation| of the token embedding, each block's
attention output, FFN output and block output (residual stream), the final norm, and the
logits, averaged over the seeds.

the verdict: for each layer kind, the log-log slope of mean |activation| against width after
the last step (0 = flat, 1 = proportional to width). muP passes when every kind is flat,
|slope| <= --max-mup-slope; as a control, SP's attention and FFN outputs must rise,
slope >= --min-sp-slope (if they do not, the run was too short to show a muP error either,
and the verdict is an inconclusive FAIL). Exit 0 on PASS, 1 on FAIL: usable in CI and
before a sweep; exit 2 for bad input, an -o that cannot be written among it (checked before
the sweep; the PNG and the .json are written both or neither). The verdict uses every
--widths; keep them >= 128, where the asymptotics hold: at 64 the incoherent part of the
first Adam updates (a term that fades like 1/sqrt(width)) still lifts the narrowest model's
attention/FFN outputs (slope about -0.2 over 64..512), a finite-width effect, not a muP
error. Measured slopes and the reasoning behind the defaults are in
fljob/trainer/model/MUP.md.

how to read the plot: top row muP, bottom row SP; one column per layer (block layers averaged
over blocks); x = width, y = mean |activation|, both log2; one line per step (dark = init,
bright = last step); each panel's title has the slope and its PASS/FAIL. muP works when the
lines are flat: a layer's activations have the same size at every width, so hyperparameters
tuned at the base width carry over; a slope that grows with every step is a muP bug. In SP
the attention/FFN outputs and the logits rise with width, more with every step, because each
update adds lr x width to them. Expected under muP: the logits start lower the wider the
model (slope -0.5 at init, the 1/m logit multiplier) and level out after a few steps. The
numbers and the verdict go to a .json beside the PNG. Runs on the CPU: the default sweep
(3 seeds) takes about two minutes on 2 cores.

examples:
  fljob mup coord-check                                   tiny flavor, widths 128..1024
  fljob mup coord-check --spec configs/local.yaml --optimizer adopt -o adopt.png
  fljob mup coord-check --spec base.yaml --widths 256,512,1024 --seeds 5   # head_dim 64
"""


class _OneLineParser(argparse.ArgumentParser):
    """A subcommand's parser that refuses a bad option value in one line (exit 2), like every
    other bad input, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(sorted({int(w) for w in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths") from None
    if len(widths) < 2 or widths[0] <= 0:
        raise argparse.ArgumentTypeError("give at least two positive widths, e.g. 64,128,256")
    return widths


def _add_mup_parser(sub: argparse._SubParsersAction) -> None:
    # Every command but `launch` (dispatched before the parser exists) loads the spec anyway.
    from fljob.spec.models import OPTIMIZER_NAMES

    mup = sub.add_parser("mup", help="muP tools: the coordinate check")
    mup_sub = mup.add_subparsers(dest="mup_command", required=True, metavar="SUBCOMMAND",
                                 parser_class=_OneLineParser)
    p = mup_sub.add_parser(
        "coord-check", help="plot activation size against width, muP beside SP (a muP self-test)",
        description="Train the model a few steps at several widths, in muP and in the standard "
                    "parametrisation, and plot each layer's activation size against width.",
        epilog=MUP_COORD_CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path,
                   help="job spec whose model (flavor, muP settings) and optimizer to use "
                        "(default: the tiny flavor, AdamW, lr 3e-3)")
    p.add_argument("--widths", type=_widths, default=(128, 256, 512, 1024),
                   help="comma-separated model widths; multiples of the flavor's head_dim, "
                        "128 or more for a meaningful verdict (default: 128,256,512,1024)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per width (default: 5)")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs per width (seeds 0..N-1: init and batches), scales averaged before "
                        "the slopes are fitted; one run's slope wanders by up to 0.4 "
                        "(default: 3)")
    p.add_argument("--max-mup-slope", type=float, default=0.15,
                   help="muP passes when every layer kind's |slope| is at most this. 0.15 is a "
                        "1.23x change of scale over a 4x wider model; the real muP measured "
                        "within 0.09 at widths 128..1024, and 0.7 to 1.2 when one muP rule is "
                        "switched off (default: 0.15)")
    p.add_argument("--min-sp-slope", type=float, default=1.2,
                   help="the control: SP's attention and FFN outputs must reach this slope. "
                        "SP's attention output has slope 1 at init (two matrices of "
                        "width-independent std) and each update adds lr x width to it: 1.3 to "
                        "1.7 measured after 2 to 5 steps. Below 1.2 the updates have not shown "
                        "yet, so a muP error in a learning rate could not show either "
                        "(default: 1.2)")
    p.add_argument("--vocab-size", type=int,
                   help="BPE vocabulary of the check (default: the flavor's); smaller is faster")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES,
                   help="optimizer (default: the spec's)")
    p.add_argument("-o", "--output", type=Path, default=Path("coord_check.png"),
                   help="PNG to write; the raw numbers and the verdict go beside it as .json "
                        "(default: coord_check.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


DATA_PREPARE_EPILOG = """\
SRC is a text file (one document), a JSONL file (one document per record), a folder of
them (*.txt, *.md, *.rst, *.jsonl, searched recursively), or builtin:pydoc: the Python
documentation that ships with every CPython (pydoc_data.topics), real English text that
exists offline on any machine. DEST is a folder or s3://bucket/prefix. Documents are joined
with EOS and cut into samples of seq_len+1 tokens; DEST gets zstd MDS shards, index.json,
tokenizer.json and fljob_index.json (token counts; written last, it marks DEST complete).

input must be UTF-8 text: a file or JSONL record that is not UTF-8 (convert it: iconv -t
UTF-8), holds a NUL character (binary data, UTF-16) or is more than 10% control characters
stops the run, naming the file (and line); nothing is skipped. So does a JSONL line that is
not a JSON object with a string text field, and a corpus with no text or too little for one
sample. A folder's files with other suffixes are not read.

all or nothing: options, SRC and DEST (new or empty, writable; with --overwrite it may
hold a dataset, complete or partial, which is removed first: nothing else) are checked
before the first write: a refusal is one line, exit 2, nothing written. A run that fails
later removes everything it wrote: exit 2 for bad input found late, exit 1 for a write
that failed (a full disk, a refused upload), one line naming the path and the cause. Should
the removal fail too, what is left has no fljob_index.json: the trainer will not read it,
a later run names it as a partial dataset, and --overwrite replaces it.

--validation-fraction F holds out about F of the documents for the held-out loss that
training.validation_interval evaluates. Each document goes whole to one side, decided by a
hash of its text: the same split every time, disjoint, repeated documents on one side. DEST
then holds two complete datasets with the same tokenizer.json (a trained BPE learns from
the training documents only):
  DEST/train/        ->  data: {streams: [{uri: DEST/train}]}
  DEST/validation/   ->        validation: [{uri: DEST/validation}]

S3: endpoint and region from --endpoint-url/--region, $S3_ENDPOINT_URL/$AWS_DEFAULT_REGION
or the storage: section of --spec; credentials only from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the spec's references.

examples:
  fljob data prepare builtin:pydoc data/pydoc-128 --seq-len 128
  fljob data prepare corpus.jsonl s3://datasets/corpus --tokenizer tokenizer.json \\
      --endpoint-url http://127.0.0.1:8080
  then train from it:  data: {streams: [{uri: s3://datasets/corpus}]}
  fljob data prepare corpus/ s3://datasets/corpus --validation-fraction 0.01
  then:  data: {streams: [{uri: s3://datasets/corpus/train}],
                validation: [{uri: s3://datasets/corpus/validation}]}
"""


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare training data (text/JSONL -> MDS shards)")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND",
                                   parser_class=_OneLineParser)
    p = data_sub.add_parser(
        "prepare", help="tokenize and pack text into zstd MDS shards (local or s3://)",
        description="Tokenize text, pack it into fixed-length samples and write MDS shards.",
        epilog=DATA_PREPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="text file, JSONL file, folder of them, or builtin:pydoc")
    p.add_argument("dest", help="output folder or s3://bucket/prefix (new or empty)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per training sequence; samples hold seq-len+1 (default: 128)")
    p.add_argument("--tokenizer", metavar="PATH_OR_URI",
                   help="tokenizer.json (path or s3:// URI); default: train a byte-level BPE on SRC")
    p.add_argument("--vocab-size", type=int,
                   help="vocabulary of the trained BPE, at least 257 (default: the model "
                        "flavors' 8192); not with --tokenizer")
    p.add_argument("--text-field", default="text",
                   help="JSONL field holding the text (default: text); only for JSONL input")
    p.add_argument("--shard-size", default="64mb",
                   help="uncompressed shard size limit, below 4gb: 512kb, 64mb, 1gb "
                        "(default: 64mb)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset (complete or partial) at DEST: it is removed first")
    p.add_argument("--validation-fraction", type=float, metavar="F",
                   help="hold out about F of the documents (0 < F < 1): write DEST/train and "
                        "DEST/validation instead of one dataset (see below)")
    p.add_argument("--spec", type=Path, help="take S3 endpoint, region and credential references "
                                             "from this job spec's storage: section")
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $S3_ENDPOINT_URL, else AWS)")
    p.add_argument("--region", help="S3 region (default: $AWS_DEFAULT_REGION, else us-east-1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


EXPORT_HF_EPILOG = """\
CHECKPOINT is one of (local or s3://; the step is `latest`, checked against its COMMITTED
marker, unless --step names another committed one):
  a run folder          runs/tiny-mup            (its spec.yaml or job_config.json says where
                                                  its checkpoints are)
  a checkpoint URI      runs/tiny-mup/checkpoints, s3://bucket/ckpt/tiny-mup
  one step of it        runs/tiny-mup/checkpoints/step-50
Only the model's tensors are read (never the optimizer state), on the CPU, from a checkpoint
saved by any number of ranks. The model is the one the step's manifest.json records (the
run's resolved spec); embedding norm and peri-norms are read from the stored tensors.

OUT gets (written all at once, or nothing; OUT must be new or empty):
  config.json, generation_config.json   a LlamaConfig (or fljob_llama, below)
  model.safetensors                     float32; above --max-shard-size:
                                        model-0000i-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.json, tokenizer_config.json the run's tokenizer: --tokenizer, else the spec's
                                        data.tokenizer, else <run folder>/data/tokenizer.json,
                                        else tokenizer.json beside the first data stream
  fljob_reference.json                  a fixed text's tokens, fljob's float32 logits at the
                                        first and last position and its loss: the proof
  modeling_fljob_llama.py               only when a stock Llama cannot compute the model

muP is folded into the weights (the same function, no multiplier left in the config):
  input multiplier      -> embed_tokens (the embedding norm's gain when there is one)
  residual L^-alpha     -> o_proj and down_proj (the peri-norm gains when there are any)
  logit output_alpha/m  -> the final norm's gain (model.norm)
  attention 1/head_dim  -> q_proj (by sqrt(head_dim)/head_dim; HF scales by 1/sqrt(head_dim))
A stock LlamaForCausalLM is written when the model allows it. Embedding norm, peri-norms
and a tied embedding with input_alpha != 1 have no stock equivalent: then config.json's
auto_map names modeling_fljob_llama.py, shipped in OUT (a LlamaForCausalLM with those
modules added), and loading needs trust_remote_code=True.

After writing, OUT is loaded back with transformers (float32, CPU) and its logits are
checked against fljob_reference.json (tolerance 1e-4 + 1e-5 x |logit|); --no-verify skips it.

load it:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("out/", trust_remote_code=True)
  tokenizer = AutoTokenizer.from_pretrained("out/")
  ids = tokenizer("Return a new sorted list", return_tensors="pt").input_ids
  print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))

examples:
  fljob export hf runs/tiny-mup -o hf/tiny-mup
  fljob export hf s3://bucket/ckpt/tiny-mup --step 500 -o hf/ --endpoint-url http://127.0.0.1:8080
"""

IMPORT_HF_EPILOG = """\
HF_FOLDER is a local Hugging Face folder of a Llama (config.json with model_type llama, or
fljob_llama from `fljob export hf`) with safetensors weights. The target model is the spec's
(SPEC and --set: model.flavor, model.width, model.depth and the muP settings) at the folder's
vocabulary: every config value that changes the function must match it (hidden size,
layers, heads, KV heads, FFN width, RoPE theta and type, norm epsilon, no biases, tying),
and every tensor must have the model's shape (the error names the tensor and both shapes).
The spec's muP multipliers are divided out of the weights (the inverse of export's
folding), so the fljob model computes what the HF model computed.

CHECKPOINT (a new folder or s3:// prefix) gets step-0 with the model weights only, its
manifest (the spec) and COMMITTED, and `latest`, as the trainer writes them; the folder's
tokenizer.json is copied beside them. Start a run from it with
  checkpoint: {init_from: CHECKPOINT}     data: {tokenizer: CHECKPOINT/tokenizer.json}
(init_from applies only when the run has nothing of its own to resume; do not point
checkpoint.uri at it: it has no optimizer state.)

examples:
  fljob import hf hf/tiny-mup spec.yaml -o imported/
  fljob import hf llama-dir/ spec.yaml --set model.width=512 -o s3://bucket/init/llama
"""


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3 endpoint (default: the spec's storage, $S3_ENDPOINT_URL, else AWS)")
    p.add_argument("--region", help="S3 region (default: the spec's storage, $AWS_DEFAULT_REGION, else us-east-1)")


def _add_hf_parsers(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a checkpoint for other tools (hf: Hugging Face transformers)")
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    p = export_sub.add_parser(
        "hf", help="a folder that transformers' AutoModelForCausalLM loads, muP folded, logits proven equal",
        description="Export one committed step of an fljob checkpoint as a Hugging Face model folder.",
        epilog=EXPORT_HF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder, checkpoint URI or step folder")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="folder to write (new or empty)")
    p.add_argument("--step", type=int, help="committed step to export (default: latest)")
    p.add_argument("--tokenizer", metavar="PATH_OR_URI", help="the run's tokenizer.json (default: found from the run)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file before the weights are sharded (default: 5GB)")
    p.add_argument("--no-verify", action="store_true", help="do not load OUT back to compare its logits")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--spec", type=Path, help="take S3 endpoint, region and credential references from this "
                                             "job spec's storage: section")
    _add_storage_args(p)

    imp = sub.add_parser("import", help="import a model from other tools (hf: a Hugging Face Llama)")
    imp_sub = imp.add_subparsers(dest="import_command", required=True, metavar="FORMAT")
    p = imp_sub.add_parser(
        "hf", help="a Hugging Face Llama folder as a committed fljob checkpoint to start a run from",
        description="Import a Hugging Face Llama whose shapes the spec's model matches as an fljob checkpoint.",
        epilog=IMPORT_HF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_folder", type=Path, metavar="HF_FOLDER", help="Hugging Face model folder")
    p.add_argument("-o", "--output", required=True, metavar="CHECKPOINT",
                   help="checkpoint location to write: a new folder or s3://bucket/prefix")
    _add_spec_args(p, required=False)
    _add_storage_args(p)


SWEEP_REPORT_EPILOG = """\
RUNS is where a sweep's trials left their summary.json:
  a run folder     runs/lr-width      the sweep's run_dir: sweep.json and one folder per trial
                                      (what `fljob submit` of a spec with a sweep: block makes)
  an S3 prefix     s3://bucket/ckpt   the sweep's checkpoint.uri: each trial copies its summary
                                      to <prefix>/<trial name>/summary.json; trials are found by
                                      listing (endpoint: --endpoint-url, $S3_ENDPOINT_URL or
                                      $AWS_ENDPOINT_URL; credentials from the environment)
A sweep still running, or with failed trials, is reported as far as it got: trials without a
summary are listed as missing, unfinished ones as such, and only completed trials count.

the rules: seeds (training.seed in the grid) are averaged; the loss is the final held-out
(validation) loss, or the final train loss, labelled so, when no trial has one; the optimum
of a width is the learning rate with the lowest mean loss over its completed seeds, among
those where no seed diverged (an lr where any seed diverged is not an optimum). muP and
SP (model.mup in the grid), and any other swept field, are compared apart. The verdict: how
many grid steps (positions in the sorted swept learning rates) the optimum moved from the
narrowest to the widest width with an optimum; 0 is what muP promises, SP drifts down.

OUT gets (all three files or none):
  report.json    every trial (index, name, overrides, state, final train and validation
                 loss with its step, diverged), every (width, lr) point (mean/min/max over
                 seeds), the optimum per width and the verdict per group; NaN/inf as strings
  transfer.png   the loss against optimizer.lr (log2 axis), one line per width (dark =
                 narrow, bright = wide), muP and SP side by side sharing the y axis; the band
                 spans the seeds, a star marks each width's optimum; an x on the top edge is
                 a diverged trial, a hollow triangle a loss above the axis (the axis stops
                 at the outliers so they do not flatten the curves). muP transfers when the
                 stars line up vertically.
  best.yaml      the optimum at the tuned width (the narrowest, or --tuned-width) as a job
                 spec for the target width (the widest, or --target-width): the trial's
                 resolved spec with model.width set, its own name (<sweep>-best) and run_dir.
                 With muP and SP swept, the muP optimum (that is what transfers). Not written
                 when the tuned width has no optimum.
stdout: the optimum per width, the verdicts, and the diverged, unfinished and missing trials.

examples:
  fljob sweep report runs/lr-width -o report/
  fljob sweep report s3://bucket/ckpt/lr-width -o report/ --endpoint-url http://127.0.0.1:8080
  fljob sweep report runs/lr-width -o report/ --tuned-width 256 --target-width 4096
  fljob validate report/best.yaml && fljob submit --backend slurm report/best.yaml
"""


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="sweep tools: report (does the optimum hold across width?)")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    p = sweep_sub.add_parser(
        "report", help="optimum per width, the muTransfer verdict, transfer.png and best.yaml",
        description="Compare a sweep's trials by their final loss: the best learning rate of every "
                    "width, for muP and SP, and whether it moved as the model got wider.",
        epilog=SWEEP_REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", metavar="RUNS", help="the sweep's run folder, or s3://bucket/prefix of its trials")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="folder for report.json, transfer.png and best.yaml (created if missing)")
    p.add_argument("--tuned-width", type=int, metavar="W",
                   help="width whose optimum goes into best.yaml (default: the narrowest swept)")
    p.add_argument("--target-width", type=int, metavar="W",
                   help="model.width of best.yaml (default: the widest swept)")
    p.add_argument("--endpoint-url", help="S3 endpoint for an s3:// RUNS (default: $S3_ENDPOINT_URL, "
                                          "$AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--region", help="S3 region (default: $AWS_DEFAULT_REGION, else us-east-1)")


# --------------------------------------------------------------------------- commands


def cmd_data(args: argparse.Namespace) -> int:
    """`fljob data prepare`: storage settings into the environment, then the preparation."""
    import dataclasses
    import os

    from fljob.spec.models import Storage
    from fljob.storage import apply_storage_environment

    if args.spec:
        storage = _load(argparse.Namespace(spec=args.spec, overrides=[], site=None)).storage
    else:
        storage = Storage(region=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                          endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
    storage = storage.model_copy(update={
        "endpoint_url": args.endpoint_url or storage.endpoint_url,
        "region": args.region or storage.region})
    apply_storage_environment(storage)
    from fljob.trainer.data.mds_prepare import PrepareConfig, prepare_mds, prepare_split

    config = PrepareConfig(
        src=args.src, dest=args.dest, seq_len=args.seq_len, tokenizer=args.tokenizer,
        text_field=args.text_field, shard_size=args.shard_size, overwrite=args.overwrite)
    if args.vocab_size is not None:
        if args.tokenizer:
            raise UsageError("--vocab-size sizes the BPE trained on SRC; with --tokenizer the "
                             "vocabulary is the tokenizer's: leave one of them out")
        config = dataclasses.replace(config, vocab_size=args.vocab_size)
    if args.validation_fraction is None:
        written = {args.dest: prepare_mds(config, progress=not args.no_progress)}
    else:
        written = prepare_split(config, args.validation_fraction, progress=not args.no_progress)
    for uri, index in written.items():
        print(f"{uri}: {index.documents} documents, {index.tokens} tokens, "
              f"{index.samples} samples of {index.seq_len + 1} tokens (vocab {index.vocab_size})")
    if args.validation_fraction is not None:
        train, validation = written
        print(f"train from it:  data: {{streams: [{{uri: {train}}}], "
              f"validation: [{{uri: {validation}}}]}}")
    return 0


def _load(args: argparse.Namespace):
    from fljob.spec import load_spec

    return load_spec(args.spec, args.overrides, args.site)


def cmd_validate(args: argparse.Namespace) -> int:
    spec = _load(args)
    if args.backend:
        from fljob import backends

        backends.get(args.backend).check(spec)
    if args.print_spec:
        from fljob.spec import dump_spec

        sys.stdout.write(dump_spec(spec))
        return 0
    what = f"{spec.name}, {spec.model.flavor}, {spec.optimizer.name}, " \
           f"{spec.world_size} process{'es' if spec.world_size > 1 else ''}"
    if spec.sweep is not None:
        from fljob.spec.sweep import expand

        what += f", a sweep of {len(expand(spec))} trials"
    print(f"{args.spec}: ok ({what})")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from fljob import backends

    spec = _load(args)
    files = backends.get(args.backend).render(spec, task="doctor" if args.doctor else "train")
    if str(args.output) == "-":
        for f in files:
            sys.stdout.write(f"# ---- {f.name}\n{f.content}")
        return 0
    from fljob.backends.base import write_rendered

    for path in write_rendered(args.output or Path(spec.resolved_run_dir), files):
        print(path)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from fljob.spec import JobSpec

    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fljob job spec"
    print(json.dumps(schema, indent=2, sort_keys=True))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from fljob.observability.dashboards import write_dashboard_files

    for path in write_dashboard_files(args.output, args.namespace):
        print(path)
    return 0


def cmd_mup(args: argparse.Namespace) -> int:
    """`fljob mup coord-check`: the sweep, the PNG + JSON, and the verdict (exit 1 on FAIL)."""
    from fljob.spec import JobSpec

    spec = _load(argparse.Namespace(spec=args.spec, overrides=[], site=None)) if args.spec \
        else JobSpec(name="coord-check")
    # 257: the byte-level BPE's 256 bytes and its end-of-text token.
    for option, value, least in (("--steps", args.steps, 1), ("--seeds", args.seeds, 1),
                                 ("--vocab-size", args.vocab_size, 257)):
        if value is not None and value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
    for option, value in (("--max-mup-slope", args.max_mup_slope),
                          ("--min-sp-slope", args.min_sp_slope)):
        if not value > 0:
            raise UsageError(f"{option} must be positive, got {value}")
    from fljob.files import check_writable

    if args.output.is_dir():
        raise UsageError(f"-o {args.output} is a folder; name the PNG to write, e.g. "
                         f"{args.output / 'coord_check.png'}")
    check_writable(args.output.parent)  # now, not after minutes of training
    from fljob.exitcodes import FAILED, OK
    from fljob.trainer.coord_check import (
        Bounds,
        CoordCheckConfig,
        run_coord_check,
        sweep_args,
        verdict,
        verdict_report,
        write_outputs,
    )

    config = CoordCheckConfig(widths=args.widths, steps=args.steps, optimizer=args.optimizer,
                              vocab_size=args.vocab_size, seeds=args.seeds)
    try:
        sweep_args(spec, config)
    except ValueError as exc:  # a width the flavor's heads cannot make
        raise UsageError(f"--widths: {exc}") from None
    result = run_coord_check(spec, config, progress=not args.no_progress)
    checks = verdict(result, Bounds(max_mup_slope=args.max_mup_slope,
                                    min_sp_slope=args.min_sp_slope))
    for path in write_outputs(result, checks, args.output):
        print(path)
    print(verdict_report(result, checks))
    return OK if all(c.passed for c in checks) else FAILED


def _hf_storage(spec, args: argparse.Namespace):
    """The spec's storage section (or the environment's endpoint and region), with the
    command line's overrides, applied to this process (credentials from references/env)."""
    from fljob.spec.models import Storage
    from fljob.storage import apply_storage_environment

    storage = spec.storage if spec is not None else Storage(
        region=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
    storage = storage.model_copy(update={"endpoint_url": args.endpoint_url or storage.endpoint_url,
                                         "region": args.region or storage.region})
    apply_storage_environment(storage)
    return storage


def cmd_export(args: argparse.Namespace) -> int:
    """`fljob export hf`: find the step, write the folder, check it with transformers."""
    spec = _load(argparse.Namespace(spec=args.spec, overrides=[], site=None)) if args.spec else None
    storage = _hf_storage(spec, args)
    from fljob.trainer.hf.export import export_hf
    from fljob.trainer.hf.source import open_checkpoint

    source = open_checkpoint(args.checkpoint, step=args.step, storage=storage)
    result = export_hf(source, args.output, tokenizer=args.tokenizer, max_shard_size=args.max_shard_size,
                       verify=not args.no_verify, progress=not args.no_progress)
    for path in result.paths:
        print(path)
    kind = "fljob_llama (trust_remote_code=True)" if result.remote_code else "stock LlamaForCausalLM"
    print(f"{args.output}: {result.source} as {kind}, tokenizer from {result.tokenizer}"
          + (f"; transformers matches fljob: {result.verified}" if result.verified else ""))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """`fljob import hf`: check the folder against the spec's model, write step-0, commit."""
    from fljob.spec.loader import load_spec_text

    spec = _load(args) if args.spec else load_spec_text("name: hf-import\n", "<default spec>", args.overrides)
    storage = _hf_storage(spec, args)
    from fljob.trainer.checkpoint.store import CheckpointStore, normalize_uri, storage_options
    from fljob.trainer.hf.importer import import_hf

    uri = normalize_uri(args.output, os.getcwd())
    store = CheckpointStore(uri, storage_options(uri, storage, os.environ))
    result = import_hf(args.hf_folder, args.output, spec, store)
    print(f"{result.uri}: committed ({result.args.dim} wide, {result.args.n_layers} blocks, "
          f"vocabulary {result.args.vocab_size}, from {args.hf_folder})")
    print(f"start a run from it:  checkpoint: {{init_from: {uri}}}"
          + (f"  data: {{tokenizer: {result.tokenizer}}}" if result.tokenizer else ""))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """`fljob sweep report`: the S3 endpoint of an s3:// RUNS into the environment, then the report."""
    from fljob import storage
    from fljob.spec.models import Storage
    from fljob.sweep_report import report

    if storage.is_s3(args.runs):
        storage.apply_storage_environment(Storage(
            endpoint_url=args.endpoint_url or os.environ.get("S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=args.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"))
    sys.stdout.write(report(args.runs, args.output, args.tuned_width, args.target_width))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # torchrun's own arguments follow; argparse must not touch them
        from fljob.trainer.launch import main as launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)

    handlers = {
        "validate": cmd_validate,
        "render": cmd_render,
        "schema": cmd_schema,
        "data": cmd_data,
        "dashboard": cmd_dashboard,
        "mup": cmd_mup,
        "sweep": cmd_sweep,
        "export": cmd_export,
        "import": cmd_import,
    }
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        from fljob import commands  # submit/status/logs/cancel/train/launch/doctor: heavier imports

        return commands.run(args)
    except UsageError as exc:
        print(f"fljob {args.command}: {exc}", file=sys.stderr)
        return USAGE
    except JobFailed as exc:
        print(f"fljob {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
