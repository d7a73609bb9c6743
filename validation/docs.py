"""GX Data Docs of a batch: the HTML site Great Expectations users open to browse the
suites and the validation results (expectation by expectation, with the unexpected
values), built by GX itself from the batch's own context.

Why at the end, not as a checkpoint ``UpdateDataDocsAction``: the site belongs in the
batch's report folder, and for a quarantined row file that folder exists only once the
batch failed; one ``build_data_docs`` after every table also renders the index once
instead of once per table. The site is a folder beside ``validation_report.md`` (inside
a world, so it travels with it to quarantine), rebuilt from scratch on each validation."""
from __future__ import annotations

import shutil
from pathlib import Path

# The site's folder, next to the Markdown report (prefixed like the report: ``<stem>.``).
DATA_DOCS_DIR = "data_docs"
SITE_NAME = "transact_batch"


def site_dir(report_dir: Path, stem: str = "") -> Path:
    """Where a batch's site goes: ``<report folder>/<stem>data_docs``."""
    return Path(report_dir) / f"{stem}{DATA_DOCS_DIR}"


def site_config(site: Path) -> dict:
    """A local filesystem site at ``site``: expectation suites and validation results,
    no profiling section (this project profiles by itself), every run name listed (GX's
    default hides runs whose name contains "profiling", and a batch may be named so)."""
    return {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "site_section_builders": {"profiling": "None",
                                  "validations": {"run_name_filter": {"matches_regex": "."}}},
    }


def build_site(ctx, site: Path) -> Path:
    """Builds the Data Docs of everything validated in ``ctx`` into ``site`` (a stale
    site of an earlier validation is replaced) and returns its ``index.html``. Only this
    site is built: an ephemeral context also has a default site in a temporary folder."""
    site = Path(site)
    if site.exists():
        shutil.rmtree(site)
    ctx.add_data_docs_site(SITE_NAME, site_config(site))  # once per context: one site per batch
    ctx.build_data_docs(site_names=[SITE_NAME])
    index = site / "index.html"
    if not index.is_file():
        raise RuntimeError(f"GX built no Data Docs index at {index}")
    _prune_static(site)
    return index


def _prune_static(site: Path) -> None:
    """Deletes the static files no page or stylesheet names. GX copies ~4.4 MB of assets
    into every site (mostly animated GIFs of its own tutorials; the pages load their
    styles from CDNs and use only the favicon), seven times the size of a tiny world."""
    static = site / "static"
    if not static.is_dir():
        return
    text = "".join(p.read_text(errors="ignore") for p in site.rglob("*")
                   if p.suffix in (".html", ".css") and p.is_file() and static not in p.parents)
    text += "".join(p.read_text(errors="ignore") for p in static.rglob("*.css")
                    if p.name in text)
    for p in sorted(static.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_file() and p.name not in text:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
