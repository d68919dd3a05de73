from services.runtime.server import serve
from services.trainer.service import SPEC

serve(SPEC)
