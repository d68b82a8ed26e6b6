"""Vendor Vega, Vega-Lite and Vega-Embed from the npm registry (pinned and integrity-checked) into an HTML template for
`dvc plots show --html-template`, so the page DVC writes holds its scripts and opens offline.

    python docs/plots/vendor.py vendor/vega      # make setup runs it and points this clone's DVC at the template
"""
import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

# The majors DVC's own page loads from a CDN (vega 5, vega-lite 5, vega-embed 6): DVC writes Vega-Lite 5 specs.
PINS = {
    "vega": ("5.33.1", "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    "vega-lite": ("5.23.0", "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    "vega-embed": ("6.29.0", "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
}
TEMPLATE = "dvc_plots.html"


def integrity(data: bytes) -> str:
    "npm's Subresource Integrity string of a tarball."
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def npm_pack(name: str, version: str, folder: Path) -> bytes:
    "The package tarball exactly as the registry serves it (`npm pack`: no install, no dependencies)."
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(folder), "--json", "--silent"],
                         check=False, capture_output=True, text=True)
    if out.returncode != 0: sys.exit(f"npm pack {name}@{version} failed: {out.stderr.strip()[-300:]}\n"
                                     "  fix: check that the npm registry is reachable (npm config get registry)")
    return (folder/json.loads(out.stdout)[0]["filename"]).read_bytes()


def browser_build(name: str, tarball: bytes) -> dict:
    "The package's browser build (`build/<name>.min.js`, safe inside a <script> element), its licence and version."
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        def read(path): return tar.extractfile(path).read().decode() if path in tar.getnames() else ""
        meta = json.loads(read("package/package.json"))
        code = read(f"package/build/{name}.min.js").replace("</script", "<\\/script")
        return {"name": name, "version": meta["version"], "license": meta.get("license", "see package"),
                "license_text": read("package/LICENSE").replace("--", "- -"), "code": code}


def main(out_dir: str) -> None:
    packages = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, expected) in PINS.items():
            tarball = npm_pack(name, version, Path(tmp))
            if integrity(tarball) != expected:
                sys.exit(f"{name}@{version}: the tarball's integrity is not the pinned one\n"
                         "  fix: check the registry or mirror npm uses; update PINS in docs/plots/vendor.py only for a new version")
            packages.append(browser_build(name, tarball))
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), undefined=StrictUndefined, autoescape=False)
    versions = ", ".join(f"{p['name']} {p['version']}" for p in packages)
    page = env.get_template(TEMPLATE).render(packages=packages, versions=versions)
    # DVC replaces {plot_divs} with the plots, and would fill {scripts} with its CDN links: one of the first, none of the second
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page and "{refresh_tag}" not in page
    out = Path(out_dir)/TEMPLATE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(page)
    tmp_out.replace(out)
    print(f"{out}: {versions} inlined ({out.stat().st_size // 1024} KB); dvc plots show --html-template {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vendor/vega")
