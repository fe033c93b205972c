"""TI-RADS lexicon descriptors of a thyroid nodule, measured from pixels.

The echo-agent captioner segments each candidate region and hands this set a
:class:`~echo_agent.evidence.descriptor_sets.RegionPixels` (the grey neighbourhood at its working
scale, the nodule mask, generic features). From it:

* ``composition`` -- the fraction of the nodule darker than 30 % of the surrounding gland's median
  (fluid): cystic above 85 %, mixed from 15 %, else solid;
* ``echogenicity`` -- the solid part's median relative to the surrounding gland (the lexicon compares
  with the gland; "markedly hypoechoic" compares with the strap muscles, which are rarely in the
  crop, so it is approximated by a ratio below 0.5);
* ``shape`` -- taller-than-wide when the nodule's height exceeds its width;
* ``margin`` -- irregular when the outline is lobulated or spiky (solidity, radial spread), ill-defined
  when the edge is soft against the gland, else smooth;
* ``echogenic_foci`` -- present when small spots inside the nodule are much brighter than the gland.

Thresholds are round numbers from the lexicon's definitions, except the hypoechoic edge, chosen on
the DDTI train split. How each relates to the radiologists' TI-RADS categories (train split) is in
``scripts/validate_descriptors.py`` and the plug-in's ``descriptors`` section of docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from echo_agent.evidence.descriptor_sets import RegionPixels
from echo_agent.schemas import Descriptor

CYSTIC_LEVEL = 0.30  # x surrounding median: darker is fluid
CYSTIC_FRACTION = (0.15, 0.85)  # mixed / cystic lower bounds
# solid part / surrounding gland; the hypoechoic edge 0.80 was chosen on the DDTI train split (of 0.60-0.90,
# the edge whose flag ranks best with the readers' categories), the others are round numbers
ECHO_BANDS = ((0.5, "markedly hypoechoic"), (0.80, "hypoechoic"), (1.15, "isoechoic"))
TALLER_RATIO = 1.0
FOCI_LEVEL = 1.8  # x surrounding median: an echogenic focus
FOCI_MAX_AREA = 0.02  # of the nodule's area: larger bright parts are not "foci"
MARGIN_SOLIDITY = 0.88  # below: lobulated / irregular outline
MARGIN_RADIAL = 0.18  # above: spiky outline
MARGIN_SHARPNESS = 0.6  # below: soft edge against the gland


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _conf(x: float, edge: float, spread: float) -> float:
    """0.5 at the edge, towards 1 away from it (logistic in the distance over ``spread``)."""
    return float(1.0 / (1.0 + np.exp(-abs(x - edge) / max(spread, 1e-6))))


class ThyroidDescriptors:
    """The ``descriptor_set`` of the thyroid organ (see the module docstring)."""

    name = "thyroid-tirads-descriptors/1"

    def measure(self, region: RegionPixels) -> dict[str, float]:
        """The raw measurements the descriptors threshold (also what the validation script reads)."""
        roi = region.roi.astype(np.float32)
        mask = region.mask
        f = region.features
        inside = roi[mask]
        around = roi[region.surround]
        gland = max(float(np.median(around)) if around.size else float(np.median(roi)), 1.0)
        if inside.size == 0:
            return {}
        fluid = inside < CYSTIC_LEVEL * gland
        solid = inside[~fluid]
        return {
            "fluid_fraction": float(fluid.mean()),
            "echo_ratio": float(np.median(solid)) / gland if solid.size >= 8 else 0.0,
            "height_width": float(f.get("height_width_ratio", 1.0)),
            "solidity": float(f.get("solidity", 1.0)),
            "radial_std": float(f.get("radial_std", 0.0)),
            "edge_sharpness": float(f.get("edge_gradient_rel", 1.0)),
            "foci": float(self._foci_count(roi, mask, gland)),
        }

    def describe(self, region: RegionPixels) -> dict[str, Descriptor]:
        m = self.measure(region)
        if not m:
            return {}
        out: dict[str, Descriptor] = {}
        frac = m["fluid_fraction"]
        comp = "cystic" if frac >= CYSTIC_FRACTION[1] else "mixed cystic and solid" if frac >= CYSTIC_FRACTION[0] else "solid"
        edge = CYSTIC_FRACTION[1] if frac >= 0.5 else CYSTIC_FRACTION[0]
        out["composition"] = Descriptor(value=comp, confidence=_conf(frac, edge, 0.08),
                                        note=f"fluid-dark fraction {frac:.2f}")
        ratio = m["echo_ratio"]
        if comp == "cystic" or ratio <= 0.0:
            out["echogenicity"] = Descriptor(value="anechoic", confidence=out["composition"].confidence,
                                             note="almost entirely fluid")
        else:
            value, edge = "hyperechoic", ECHO_BANDS[-1][0]
            for upper, name in ECHO_BANDS:
                if ratio < upper:
                    value, edge = name, upper
                    break
            out["echogenicity"] = Descriptor(value=value, confidence=_conf(np.log(ratio), np.log(edge), 0.12),
                                             note=f"solid part / surrounding gland {ratio:.2f}")
        hw = m["height_width"]
        out["shape"] = Descriptor(value="taller-than-wide" if hw > TALLER_RATIO else "wider-than-tall",
                                  confidence=_conf(np.log(max(hw, 1e-3)), np.log(TALLER_RATIO), 0.1),
                                  note=f"height/width {hw:.2f}")
        solidity, radial, sharp = m["solidity"], m["radial_std"], m["edge_sharpness"]
        if solidity < MARGIN_SOLIDITY or radial > MARGIN_RADIAL:
            margin, conf = "irregular", _conf(solidity, MARGIN_SOLIDITY, 0.03)
        elif sharp < MARGIN_SHARPNESS:
            margin, conf = "ill-defined", _conf(sharp, MARGIN_SHARPNESS, 0.15)
        else:
            margin, conf = "smooth", min(_conf(solidity, MARGIN_SOLIDITY, 0.03), _conf(sharp, MARGIN_SHARPNESS, 0.15))
        out["margin"] = Descriptor(value=margin, confidence=conf,
                                   note=f"solidity {solidity:.2f}, radial spread {radial:.2f}, edge sharpness {sharp:.2f}")
        n = int(m["foci"])
        out["echogenic_foci"] = Descriptor(value="present" if n else "none", confidence=0.6 if n else 0.7,
                                           note=f"{n} bright spot(s) > {FOCI_LEVEL:g}x the gland inside the nodule")
        return out

    @staticmethod
    def _foci_count(roi: np.ndarray, mask: np.ndarray, gland: float) -> int:
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        bright = (roi > FOCI_LEVEL * gland) & inner
        n, _, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
        area = max(int(inner.sum()), 1)
        return sum(1 for i in range(1, n) if 2 <= stats[i, cv2.CC_STAT_AREA] <= FOCI_MAX_AREA * area)

    def caption(self, descriptors: Mapping[str, Descriptor]) -> str:
        def v(key: str) -> str:
            d = descriptors.get(key)
            return str(d.value) if d is not None else "unknown"

        size = descriptors.get("size_mm") or descriptors.get("size_px")
        size_txt = f"{size.value:g} {size.unit} " if size is not None else ""
        foci = "with echogenic foci" if v("echogenic_foci") == "present" else "without echogenic foci"
        return (f"{size_txt}{v('composition')}, {v('echogenicity')}, {v('shape')} nodule with {_article(v('margin'))} {v('margin')} margin, "
                f"{foci}.").capitalize()


THYROID_DESCRIPTORS = ThyroidDescriptors()
