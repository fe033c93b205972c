"""Evidence computed without LangChain: the pixel captioner and the knowledge retriever."""

from .captioner import PixelCaptioner as PixelCaptioner
from .captioner import load_thresholds as load_thresholds
from .captioner import region_caption as region_caption
from .knowledge import DenseRetriever as DenseRetriever
from .knowledge import KnowledgeBase as KnowledgeBase
from .knowledge import KnowledgeBaseError as KnowledgeBaseError
from .knowledge import KnowledgeEntry as KnowledgeEntry
from .knowledge import KnowledgeRetriever as KnowledgeRetriever
from .knowledge import get_retriever as get_retriever
