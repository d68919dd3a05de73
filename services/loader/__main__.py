from services.loader.service import SPEC
from services.runtime.server import serve

serve(SPEC)
