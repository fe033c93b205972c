"""`OrganSpec`: everything organ-specific, as data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The default of :attr:`OrganSpec.secondary_finding_min_score` (the first detector call's threshold).
DEFAULT_SECONDARY_MIN_SCORE = 0.25


class CategoryBand(BaseModel):
    """One assessment category and the malignancy-likelihood band that maps to it.

    A probability ``p`` falls in the band when ``low < p <= high`` (``low_inclusive`` makes it
    ``low <= p``). Bands of one organ must tile [0, 1] without gaps or overlaps. ``low``/``high``
    may be left out only for an organ whose categories come from a category head
    (``OrganSpec.category_source: classifier``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    low: float | None = Field(None, ge=0.0, le=1.0)
    high: float | None = Field(None, ge=0.0, le=1.0)
    low_inclusive: bool = False
    high_inclusive: bool = True
    description: str = ""
    management: str = ""

    def contains(self, p: float) -> bool:
        if self.low is None or self.high is None:
            return False
        above = p >= self.low if self.low_inclusive else p > self.low
        below = p <= self.high if self.high_inclusive else p < self.high
        return above and below


class AppearanceRule(BaseModel):
    """A look that gives a non-positive lesion reading its category by appearance, not by probability.

    A reading whose label is a lesion label other than the organ's ``positive_label`` gets ``category``
    when the descriptors of its leading finding take one of the listed values for every key of
    ``descriptors`` (BI-RADS: the oval, parallel, circumscribed mass is "probably benign", 3).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    descriptors: dict[str, tuple[str, ...]]
    category: str
    name: str = Field("benign finding", description="What the look is called in the Diagnosis's rationale.")


class OrganSpec(BaseModel):
    """Organ-specific configuration: labels, categories, detector weights, knowledge and prompts.

    ``image_labels`` are the image-level diagnosis labels (the first must be ``normal_label``);
    ``detector_labels`` are the classes the organ's detector emits, each mapped to an image label by
    ``detector_label_map`` (identity for labels not in the map).

    Example::

        from echo_agent import OrganSpec, register_organ
        register_organ(OrganSpec(name="liver", image_labels=("normal", "benign", "malignant"),
                                 detector_labels=("focal_lesion",), detector_label_map={"focal_lesion": "benign"},
                                 positive_label="malignant"))
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Lower-case identifier, used in tool names.")
    display_name: str = ""
    image_labels: tuple[str, ...]
    normal_label: str = "normal"
    detector_labels: tuple[str, ...]
    detector_label_map: dict[str, str] = Field(default_factory=dict)
    positive_label: str | None = Field(
        None, description="The label whose probability is scored by AUC (malignant, hydronephrosis)."
    )
    category_system: str | None = None
    categories: tuple[CategoryBand, ...] = ()
    no_lesion_category: str | None = Field(None, description="Category when no lesion is found, e.g. BI-RADS 1.")
    category_source: Literal["probability", "classifier"] = Field(
        "probability",
        description="Where a lesion's category comes from. 'probability': the band of `categories` that holds the "
        "calibrated probability of positive_label (BI-RADS from the likelihood of malignancy). 'classifier': the "
        "organ's second-look classifier is a category head -- its labels are [normal_label, *category names] -- and "
        "the category is read off its distribution on the leading finding (`category_readout`; for scales read by radiologists "
        "from the lexicon, such as TI-RADS, where no pathology label exists to calibrate against); the bands then "
        "only describe the categories and their management.",
    )
    category_readout: Literal["median", "agreement"] = Field(
        "median",
        description="With category_source 'classifier': how one category is read off the head's ordinal "
        "distribution. 'median' minimises the expected number of steps to the reader's category; 'agreement' "
        "maximises the expected exact plus within-one-step agreement with the reader (the category k with the "
        "largest 2 p(k) + p(k-1) + p(k+1)), which answers the middle of the scale when the head is unsure. See "
        "`category_readout_index`.",
    )
    category_by_suspicious_count: tuple[str, ...] = Field(
        (),
        description="A lesion's category counted from its look: entry n is the category of a finding whose "
        "descriptors show n of the `suspicious_descriptors` values (counts past the end take the last entry). "
        "For scales defined as a count of suspicious features, such as the TI-RADS of Kwak et al. (one, two, three "
        "or four, five features: 4a, 4b, 4c, 5). When set it gives the category of every described finding, "
        "whatever `category_source` says; a finding never described keeps the category `category_source` gives. "
        "Empty: not used.",
    )
    category_labels: dict[str, str] = Field(
        default_factory=dict,
        description="With category_source 'classifier': the image label each category counts towards (image-label "
        "probabilities are sums over categories). Categories not listed count towards the only lesion label, which "
        "must then exist.",
    )
    detector_weights: str | None = Field(
        None, description="ONNX weights: a path, or 'package:<relative path>' inside echo_agent/assets."
    )
    classifier_weights: str | None = Field(
        None,
        description="Second-look region classifier (ONNX exported by tools/train_classifier.py): a path, or "
        "'package:<relative path>'. Its labels must be the organ's image_labels. None: no classify tool.",
    )
    detector_input_size: int | None = Field(
        None,
        description="Side of the detector's square network input, for documentation; the detector itself reads "
        "it from the weights (a test checks that the two agree for the built-in organs).",
    )
    detector_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime intra-op threads of this organ's packaged detector (None: the backend's default, "
        "1). A larger network (e.g. one on a pretrained backbone) can gain from 2 on a small CPU; measure with "
        "tools/benchmark.py.",
    )
    detector_agnostic_nms: bool = Field(
        False,
        description="One box per location across classes: a candidate overlapping a higher-scored candidate of "
        "another class by IoU > 0.5 is merged into it (its score kept in class_scores). Use it when the classes "
        "are mutually exclusive readings of the same lesion (benign / malignant).",
    )
    knowledge_files: tuple[str, ...] = ()
    descriptor_set: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'<module>:<attribute>' of a DescriptorSet (echo_agent.evidence.descriptor_sets) that turns a "
        "candidate region's pixels into this organ's lexicon descriptors. None: the built-in sets (kidney for "
        "'kidney', the breast lexicon otherwise).",
    )
    router_head: str | None = Field(
        None,
        description="A recognition head for the organ router (asset reference; tools/train_router.py --head writes "
        "it), so images of an organ added by a plug-in are routed to it without --organ.",
    )
    prompt: str = Field("", description="Organ-specific snippet appended to the reasoner's system prompt.")
    report_sections: tuple[str, ...] = ()
    descriptor_vocabulary: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    suspicious_descriptors: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Descriptor values that argue for positive_label (e.g. an irregular shape). When the fused "
        "label is not the positive one but the top candidate shows at least conflict_min_votes of these, the "
        "reason node marks the Diagnosis indeterminate (evidence conflict). Empty: no such check.",
    )
    conflict_min_votes: int = Field(3, ge=1, description="See suspicious_descriptors.")
    benign_finding_descriptors: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="Descriptor values that together make a finding benign by its appearance (BI-RADS: a "
        "simple cyst, anechoic with a circumscribed margin, is category 2). When a lesion reading other than "
        "positive_label has a leading finding whose descriptors take one of the listed values for every key, "
        "its category is benign_finding_category instead of the probability band. Empty: no such rule.",
    )
    benign_finding_category: str | None = Field(None, description="See benign_finding_descriptors.")
    benign_finding_rules: tuple[AppearanceRule, ...] = Field(
        (),
        description="Further looks with their categories (AppearanceRule), tried in order after "
        "benign_finding_descriptors; the first that matches gives the category.",
    )
    secondary_finding_min_score: float = Field(
        DEFAULT_SECONDARY_MIN_SCORE, ge=0.0, le=1.0,
        description="Detector score a candidate other than the leading one needs to be reported as a further "
        "finding (the fusions' default; a fusion given its own secondary_min_score uses that). Raise it where "
        "an image rarely holds more than one lesion and the detector's weaker boxes are mostly false.",
    )

    @model_validator(mode="after")
    def _check(self) -> OrganSpec:
        if not self.image_labels or self.image_labels[0] != self.normal_label:
            raise ValueError(
                f"organ {self.name!r}: image_labels must start with the normal label "
                f"{self.normal_label!r}, got {self.image_labels}"
            )
        if len(set(self.image_labels)) != len(self.image_labels):
            raise ValueError(f"organ {self.name!r}: duplicate image labels {self.image_labels}")
        if not self.detector_labels:
            raise ValueError(f"organ {self.name!r}: detector_labels must not be empty")
        for d in self.detector_labels:
            mapped = self.detector_label_map.get(d, d)
            if mapped not in self.image_labels:
                raise ValueError(
                    f"organ {self.name!r}: detector label {d!r} maps to {mapped!r}, which is not one "
                    f"of the image labels {self.image_labels}; add it to detector_label_map"
                )
        if self.positive_label is not None and self.positive_label not in self.image_labels:
            raise ValueError(f"organ {self.name!r}: positive_label {self.positive_label!r} is not an image label")
        if self.categories and self.category_source == "probability":
            if any(b.low is None or b.high is None for b in self.categories):
                raise ValueError(f"organ {self.name!r}: probability categories need low and high on every band")
            _check_tiling(self.name, self.categories)
        if self.category_source == "classifier":
            if not self.categories:
                raise ValueError(f"organ {self.name!r}: category_source 'classifier' needs the categories it names")
            names = {b.name for b in self.categories}
            if len(names) != len(self.categories) or self.normal_label in names:
                raise ValueError(f"organ {self.name!r}: category names must be unique and differ from the normal label")
            for cat, lbl in self.category_labels.items():
                if cat not in names or lbl not in self.lesion_labels:
                    raise ValueError(f"organ {self.name!r}: category_labels maps {cat!r} -> {lbl!r}; keys must be "
                                     f"categories {sorted(names)}, values lesion labels {self.lesion_labels}")
            if len(self.lesion_labels) != 1 and set(self.category_labels) != names:
                raise ValueError(f"organ {self.name!r}: with several lesion labels every category needs an entry in "
                                 "category_labels")
        self._check_vocabulary_values("suspicious_descriptors", self.suspicious_descriptors)
        if self.suspicious_descriptors and self.positive_label is None:
            raise ValueError(f"organ {self.name!r}: suspicious_descriptors need a positive_label")
        self._check_category_by_count()
        self._check_benign_finding()
        return self

    def _check_category_by_count(self) -> None:
        table = self.category_by_suspicious_count
        if not table:
            return
        names = [b.name for b in self.categories]
        if not self.suspicious_descriptors:
            raise ValueError(f"organ {self.name!r}: category_by_suspicious_count counts suspicious_descriptors, "
                             "which are empty")
        unknown = [c for c in table if c not in names]
        if unknown:
            raise ValueError(f"organ {self.name!r}: category_by_suspicious_count names {unknown}, which are not "
                             f"categories {names}")
        if any(names.index(a) > names.index(b) for a, b in zip(table, table[1:], strict=False)):
            raise ValueError(f"organ {self.name!r}: category_by_suspicious_count {list(table)} must not go down the "
                             f"scale {names} as the count grows")
        if self.appearance_rules:
            raise ValueError(f"organ {self.name!r}: category_by_suspicious_count and benign_finding rules both give "
                             "a finding's category by its look; use one")

    def _check_benign_finding(self) -> None:
        if bool(self.benign_finding_descriptors) != (self.benign_finding_category is not None):
            raise ValueError(f"organ {self.name!r}: benign_finding_descriptors and benign_finding_category go together")
        names = [b.name for b in self.categories]
        legacy = 1 if self.benign_finding_descriptors else 0
        for i, rule in enumerate(self.appearance_rules):
            field = "benign_finding_descriptors" if i < legacy else f"benign_finding_rules[{i - legacy}]"
            if rule.category not in names or self.category_source != "probability":
                raise ValueError(f"organ {self.name!r}: {field} gives category {rule.category!r}, which must be one of "
                                 f"the probability bands {names}")
            if self.positive_label is None:
                raise ValueError(f"organ {self.name!r}: {field} needs a positive_label")
            if not rule.descriptors:
                raise ValueError(f"organ {self.name!r}: {field} names no descriptor")
            self._check_vocabulary_values(field, rule.descriptors, nonempty=True)

    @property
    def appearance_rules(self) -> tuple[AppearanceRule, ...]:
        """``benign_finding_descriptors`` / ``benign_finding_category`` as the first rule, then
        ``benign_finding_rules``: the order in which a reading's look is matched."""
        first = ((AppearanceRule(descriptors=self.benign_finding_descriptors, category=self.benign_finding_category),)
                 if self.benign_finding_descriptors and self.benign_finding_category is not None else ())
        return (*first, *self.benign_finding_rules)

    def _check_vocabulary_values(self, field: str, values_by_key: Mapping[str, tuple[str, ...]], *,
                                 nonempty: bool = False) -> None:
        """Each key of ``values_by_key`` (the field ``field``) is a descriptor of the vocabulary and its
        values are among that descriptor's (``nonempty``: at least one)."""
        for key, values in values_by_key.items():
            allowed = self.descriptor_vocabulary.get(key)
            if allowed is None or (nonempty and not values) or not set(values) <= set(allowed):
                raise ValueError(
                    f"organ {self.name!r}: {field}[{key!r}] = {values} must name values of "
                    f"descriptor_vocabulary[{key!r}] = {allowed}"
                )

    # -- helpers --------------------------------------------------------------------------------
    @property
    def lesion_labels(self) -> tuple[str, ...]:
        """Image labels other than normal."""
        return tuple(lbl for lbl in self.image_labels if lbl != self.normal_label)

    def image_label_for(self, detector_label: str) -> str:
        """Map a detector class to the image-level label it implies."""
        return self.detector_label_map.get(detector_label, detector_label)

    def appearance_rule(self, label: str, descriptors: Mapping[str, Any], category: str | None = None) -> AppearanceRule | None:
        """The first of :attr:`appearance_rules` that a reading ``label`` whose leading finding has
        ``descriptors`` (name -> value, or an object with ``.value``) matches, or ``None``. A look only
        softens: with the reading's ``category`` given, a rule whose category is not lower on
        :attr:`category_scale` changes nothing (``None``)."""
        if label == self.positive_label or label not in self.lesion_labels:
            return None
        for rule in self.appearance_rules:
            if all(getattr(descriptors.get(k), "value", descriptors.get(k)) in values for k, values in rule.descriptors.items()):
                scale = self.category_scale
                lower = category is None or category not in scale or scale.index(rule.category) < scale.index(category)
                return rule if lower else None
        return None

    def benign_finding(self, label: str, descriptors: Mapping[str, Any]) -> str | None:
        """The category a look gives a reading ``label`` whose leading finding has ``descriptors``, or
        ``None`` when no look applies (:meth:`appearance_rule`).

        >>> from echo_agent.organs import get_organ
        >>> get_organ("breast").benign_finding("benign", {"echo_pattern": "anechoic", "margin": "circumscribed"})
        '2'
        >>> get_organ("breast").benign_finding("malignant", {"echo_pattern": "anechoic", "margin": "circumscribed"})
        """
        rule = self.appearance_rule(label, descriptors)
        return rule.category if rule is not None else None

    def category_for(self, positive_probability: float | None, lesion_found: bool = True) -> str | None:
        """The category (e.g. BI-RADS) for a calibrated probability of the positive label."""
        if not self.categories:
            return None
        if not lesion_found:
            return self.no_lesion_category
        if positive_probability is None or self.category_source != "probability":
            return None  # a category head's category comes from category_from_distribution
        p = min(max(float(positive_probability), 0.0), 1.0)
        for band in self.categories:
            if band.contains(p):
                return band.name
        raise AssertionError(f"bands of {self.name} do not cover p={p}")  # prevented by _check_tiling

    @property
    def category_scale(self) -> tuple[str, ...]:
        """The organ's categories in ordinal order, the no-lesion category first (BI-RADS: 1, 2, 3,
        4A, 4B, 4C, 5); empty when the organ has none."""
        names = tuple(b.name for b in self.categories)
        if self.no_lesion_category and self.no_lesion_category not in names:
            return (self.no_lesion_category, *names)
        return names

    @property
    def classifier_labels(self) -> tuple[str, ...]:
        """The labels the organ's second-look classifier must have: the image labels, or with a
        category head (``category_source: classifier``) the normal label and the category names."""
        if self.category_source == "classifier":
            return (self.normal_label, *(b.name for b in self.categories))
        return self.image_labels

    def split_classifier_output(self, probs: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float] | None]:
        """``(image-label probabilities, category probabilities or None)`` of one classifier output.

        Without a category head the output already is over the image labels. With one, each lesion
        label sums the probabilities of its categories, and the categories are renormalised to the
        distribution given a lesion (``None`` when the classifier is sure there is none)."""
        if self.category_source != "classifier":
            return {k: float(v) for k, v in probs.items()}, None
        labels = {lbl: 0.0 for lbl in self.image_labels}
        labels[self.normal_label] = float(probs[self.normal_label])
        cats = {b.name: float(probs[b.name]) for b in self.categories}
        default = self.lesion_labels[0] if len(self.lesion_labels) == 1 else None
        for cat, p in cats.items():
            labels[self.category_labels.get(cat, default) or self.lesion_labels[0]] += p
        total = sum(cats.values())
        return labels, ({c: p / total for c, p in cats.items()} if total > 1e-9 else None)

    def category_from_distribution(self, category_probs: Mapping[str, float]) -> str:
        """One category of an ordinal distribution over the organ's categories (in band order), by the
        organ's ``category_readout`` (:func:`category_readout_index`): by default the median, the
        category that minimises the expected number of steps to the reader's."""
        probs = [float(category_probs.get(b.name, 0.0)) for b in self.categories]
        return self.categories[category_readout_index(probs, self.category_readout)].name

    @property
    def category_from_probability(self) -> bool:
        """Whether a lesion's category is the band of the positive label's calibrated probability
        (BI-RADS), so a reading's category must agree with its probabilities: probability bands, a
        positive label, and no count of suspicious values (``category_by_suspicious_count``)."""
        return (bool(self.categories) and self.positive_label is not None and self.category_source == "probability"
                and not self.category_by_suspicious_count)

    def suspicious_hits(self, descriptors: Mapping[str, Any]) -> list[str]:
        """The ``suspicious_descriptors`` values that ``descriptors`` (key -> a descriptor with a
        ``value``) show, each as "<key> <value>", in the order the organ lists them."""
        hits = []
        for key, values in self.suspicious_descriptors.items():
            d = descriptors.get(key)
            if d is not None and str(d.value) in values:
                hits.append(f"{key.replace('_', ' ')} {d.value}")
        return hits

    def category_for_count(self, count: int) -> str | None:
        """The category of ``count`` suspicious values by ``category_by_suspicious_count`` (``None``
        when the organ has no such table)."""
        table = self.category_by_suspicious_count
        if not table:
            return None
        if count < 0:
            raise ValueError(f"a count of suspicious values cannot be negative, got {count}")
        return table[min(count, len(table) - 1)]

    def band(self, name: str) -> CategoryBand | None:
        return next((b for b in self.categories if b.name == name), None)

    def resolve_weights(self) -> Path | None:
        """The detector weights as a filesystem path (``None`` when the organ has none)."""
        return resolve_asset(self.detector_weights) if self.detector_weights else None

    def resolve_classifier_weights(self) -> Path | None:
        """The region classifier's weights as a filesystem path (``None`` when the organ has none)."""
        return resolve_asset(self.classifier_weights) if self.classifier_weights else None

    def resolve_router_head(self) -> Path | None:
        """The router head file as a filesystem path (``None`` when the organ has none)."""
        return resolve_asset(self.router_head) if self.router_head else None

    def resolve_knowledge_files(self) -> list[Path]:
        return [resolve_asset(p) for p in self.knowledge_files]


def resolve_asset(ref: str) -> Path:
    """Turn an asset reference into a path.

    * ``'package:<rel>'``: a file inside ``echo_agent/assets``;
    * ``'resource:<importable package>/<rel>'``: a file inside any installed package, e.g. a plug-in's
      own weights (``resource:my_organ_plugin/weights/detector.onnx``);
    * anything else: a filesystem path (``~`` expanded).
    """
    if ref.startswith("package:"):
        rel = ref[len("package:") :]
        return Path(str(resources.files("echo_agent") / "assets" / rel))
    if ref.startswith("resource:"):
        package, _, rel = ref[len("resource:") :].partition("/")
        if not package or not rel:
            raise ValueError(f"asset reference {ref!r} must look like 'resource:<package>/<path inside it>'")
        try:
            base = resources.files(package)
        except ModuleNotFoundError:
            raise ValueError(f"asset reference {ref!r}: package {package!r} is not installed") from None
        return Path(str(base / rel))
    return Path(ref).expanduser()


def category_readout_index(probs: Sequence[float], readout: str = "median") -> int:
    """The index of the category read off an ordinal distribution ``probs`` (categories in scale order;
    renormalised, all-zero read as uniform).

    ``median``: the first category whose cumulative probability reaches one half (it minimises the
    expected number of steps to the true category). ``agreement``: the category k with the largest
    expected exact plus within-one agreement, ``2 p(k) + p(k-1) + p(k+1)`` (a neighbour outside the
    scale counts 0); ties go to the lower category."""
    p = [max(float(x), 0.0) for x in probs]
    if not p:
        raise ValueError("category_readout_index needs at least one category")
    total = sum(p)
    p = [x / total for x in p] if total > 0 else [1.0 / len(p)] * len(p)
    if readout == "median":
        acc = 0.0
        for i, x in enumerate(p):
            acc += x
            if acc >= 0.5:
                return i
        return len(p) - 1
    if readout == "agreement":
        def score(k: int) -> float:
            return 2 * p[k] + (p[k - 1] if k > 0 else 0.0) + (p[k + 1] if k + 1 < len(p) else 0.0)

        return max(range(len(p)), key=lambda k: (score(k) - 1e-12 * k))
    raise ValueError(f"unknown category read-out {readout!r}; use 'median' or 'agreement'")


def _check_tiling(name: str, bands: tuple[CategoryBand, ...]) -> None:
    # Probe points on a fine grid plus every band edge and its neighbours.
    probes = {i / 1000 for i in range(1001)}
    for b in bands:
        for e in (b.low or 0.0, b.high or 0.0):
            probes.update({e, min(1.0, e + 1e-9), max(0.0, e - 1e-9)})
    for p in sorted(probes):
        hits = [b.name for b in bands if b.contains(p)]
        if len(hits) != 1:
            raise ValueError(
                f"organ {name!r}: category bands must cover [0, 1] exactly once; p={p:g} falls in {hits or 'none'}"
            )
