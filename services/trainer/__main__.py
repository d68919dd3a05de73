from services.trainer.service import SPEC
from services.runtime.server import serve

serve(SPEC)
