from services.runtime.server import serve
from services.serving.service import SPEC

serve(SPEC)
