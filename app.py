"""slimlm web app: `streamlit run app.py`. Pages are thin views over the engine in core/."""
import streamlit as st

from core import paths
from core.store import Store

st.set_page_config(page_title="slimlm", layout="wide")


@st.cache_resource
def get_store(path: str) -> Store:
    return Store(path)


# Pages read the shared Store from session state (and build their own when run on their own).
st.session_state["store"] = get_store(str(paths.store_path()))

new = st.Page("pages/new_experiment.py", title="New experiment", icon=":material/science:", url_path="new")
# The default page is served at "/" and not at its own url_path, so "/" redirects to /new to make
# both addresses work.
home = st.Page(lambda: st.switch_page(new), title="slimlm", url_path="home", default=True, visibility="hidden")
nav = st.navigation([
    home,
    new,
    st.Page("pages/experiments.py", title="Experiments", icon=":material/list:", url_path="experiments"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/run_detail.py", title="Run detail", icon=":material/description:", url_path="run"),
    st.Page("pages/cost_model.py", title="Cost model", icon=":material/calculate:", url_path="cost"),
])

with st.sidebar:
    st.caption(
        "**slimlm** compresses a language model and measures what it costs in accuracy, memory "
        "and latency on the real model. Experiments run in background worker processes, so you "
        f"can close the tab; results are kept in `{paths.data_dir()}`."
    )

nav.run()
