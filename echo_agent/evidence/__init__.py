"""Evidence computed without LangChain: the pixel captioner and the knowledge retriever."""

from .captioner import PixelCaptioner as PixelCaptioner
from .captioner import load_thresholds as load_thresholds
from .captioner import region_caption as region_caption
