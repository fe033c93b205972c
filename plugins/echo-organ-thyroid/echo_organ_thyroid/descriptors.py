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

Thresholds are round numbers chosen from the lexicon's definitions, not fitted; their agreement with
the radiologists' TI-RADS categories on the train split is in this package's MODEL_CARD.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from echo_agent.evidence.descriptor_sets import RegionPixels
from echo_agent.schemas import Descriptor

CYSTIC_LEVEL = 0.30  # x surrounding median: darker is fluid
CYSTIC_FRACTION = (0.15, 0.85)  # mixed / cystic lower bounds
ECHO_BANDS = ((0.5, "markedly hypoechoic"), (0.85, "hypoechoic"), (1.15, "isoechoic"))
TALLER_RATIO = 1.0
FOCI_LEVEL = 1.8  # x surrounding median: an echogenic focus
FOCI_MAX_AREA = 0.02  # of the nodule's area: larger bright parts are not "foci"


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _conf(x: float, edge: float, spread: float) -> float:
    """0.5 at the edge, towards 1 away from it (logistic in the distance over ``spread``)."""
    return float(1.0 / (1.0 + np.exp(-abs(x - edge) / max(spread, 1e-6))))


class ThyroidDescriptors:
    """The ``descriptor_set`` of the thyroid organ (see the module docstring)."""

    name = "thyroid-tirads-descriptors/1"

    def describe(self, region: RegionPixels) -> dict[str, Descriptor]:
        roi = region.roi.astype(np.float32)
        mask = region.mask
        f = region.features
        out: dict[str, Descriptor] = {}
        inside = roi[mask]
        around = roi[region.surround]
        gland = float(np.median(around)) if around.size else float(np.median(roi))
        gland = max(gland, 1.0)
        if inside.size == 0:
            return out
        fluid = inside < CYSTIC_LEVEL * gland
        frac = float(fluid.mean())
        comp = "cystic" if frac >= CYSTIC_FRACTION[1] else "mixed cystic and solid" if frac >= CYSTIC_FRACTION[0] else "solid"
        edge = CYSTIC_FRACTION[1] if frac >= 0.5 else CYSTIC_FRACTION[0]
        out["composition"] = Descriptor(value=comp, confidence=_conf(frac, edge, 0.08),
                                        note=f"fluid-dark fraction {frac:.2f}")
        solid = inside[~fluid]
        if comp == "cystic" or solid.size < 8:
            out["echogenicity"] = Descriptor(value="anechoic", confidence=out["composition"].confidence,
                                             note="almost entirely fluid")
        else:
            ratio = float(np.median(solid)) / gland
            value, edge = "hyperechoic", ECHO_BANDS[-1][0]
            for upper, name in ECHO_BANDS:
                if ratio < upper:
                    value, edge = name, upper
                    break
            out["echogenicity"] = Descriptor(value=value, confidence=_conf(np.log(ratio), np.log(edge), 0.12),
                                             note=f"solid part / surrounding gland {ratio:.2f}")
        hw = float(f.get("height_width_ratio", 1.0))
        out["shape"] = Descriptor(value="taller-than-wide" if hw > TALLER_RATIO else "wider-than-tall",
                                  confidence=_conf(np.log(max(hw, 1e-3)), 0.0, 0.1), note=f"height/width {hw:.2f}")
        solidity = float(f.get("solidity", 1.0))
        radial = float(f.get("radial_std", 0.0))
        sharp = float(f.get("edge_gradient_rel", 1.0))
        if solidity < 0.88 or radial > 0.18:
            margin, conf = "irregular", _conf(solidity, 0.88, 0.03)
        elif sharp < 0.6:
            margin, conf = "ill-defined", _conf(sharp, 0.6, 0.15)
        else:
            margin, conf = "smooth", min(_conf(solidity, 0.88, 0.03), _conf(sharp, 0.6, 0.15))
        out["margin"] = Descriptor(value=margin, confidence=conf,
                                   note=f"solidity {solidity:.2f}, radial spread {radial:.2f}, edge sharpness {sharp:.2f}")
        out["echogenic_foci"] = self._foci(roi, mask, gland)
        return out

    @staticmethod
    def _foci(roi: np.ndarray, mask: np.ndarray, gland: float) -> Descriptor:
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        bright = (roi > FOCI_LEVEL * gland) & inner
        n, _, stats, _ = cv2.connectedComponentsWithStats(bright.astype(np.uint8), connectivity=8)
        area = max(int(inner.sum()), 1)
        spots = [int(stats[i, cv2.CC_STAT_AREA]) for i in range(1, n)
                 if 2 <= stats[i, cv2.CC_STAT_AREA] <= FOCI_MAX_AREA * area]
        present = len(spots) > 0
        return Descriptor(value="present" if present else "none", confidence=0.6 if present else 0.7,
                          note=f"{len(spots)} bright spot(s) > {FOCI_LEVEL:g}x the gland inside the nodule")

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
