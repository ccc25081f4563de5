"""The ViperGPT-compatible tool API that programs call (client side).

An :class:`ImagePatch` holds only plain data: a box in the ORIGINAL image's pixel
coordinates (``left, lower, right, upper``; x to the right, y UP from the image bottom, so
``lower < upper``) and, in private attributes, the tool caller it sends every vision op
through (see :mod:`vpd.tools.protocol`). Nothing else of the parent is reachable from a
program. Pure geometry (``overlaps_with``, ``distance``, the attributes) is computed here;
``crop`` is sent as an op too so that it shows in the execution trace.

The public names a program may use are exactly those
:func:`vpd.tools.namespace.build_namespace` returns; the
sampling prompt's API spec is generated from the docstrings below, so keep them accurate.
Private entries (``_root_patch``, ``_image_patches``, ``_run_visprog``) are for the
executor only.

Two-image questions (NLVR2): the executor passes one whole-image patch per image,
``execute_command(left_image, right_image)``; every patch remembers its image by index
(0 = left), so its tool calls go to that image. Paths never reach the program: the
executor maps the index to the file.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vpd.tools.protocol import ToolCaller

__all__ = [
    "ImagePatch",
    "answer_text",
    "best_image_match",
    "bool_to_yesno",
    "coerce_to_numeric",
    "distance",
    "make_image_handle",
]


class _ImageRef:
    """What all patches of one image share: the caller, the image's index among the
    question's images, and the (lazily asked) image size."""

    def __init__(self, caller: ToolCaller, index: int = 0) -> None:
        self._caller = caller
        self._index = index
        self._size: tuple[int, int] | None = None

    def call(self, op: str, box: Any, args: dict[str, Any]) -> Any:
        # The first image's calls carry no index: a one-image question's wire is unchanged.
        if self._index:
            return self._caller(op, box, args, image=self._index)
        return self._caller(op, box, args)

    def size(self) -> tuple[int, int]:
        if self._size is None:
            w, h = self.call("size", None, {})
            self._size = (int(w), int(h))
        return self._size


_MAX_COORD = 1 << 31  # far beyond any image; bigger values are a program bug, not a box


def _num(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what} must be a number, got {v!r}")
    # Check ints directly: math.isfinite() on a huge int raises a misleading OverflowError.
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {v!r}")
    if abs(v) >= _MAX_COORD:
        raise ValueError(f"{what} is out of range: {v!r:.40}")
    return int(v)


class ImagePatch:
    """A Python class containing a crop of an image centered around a particular object, as
    well as relevant information.

    Coordinates are pixels of the original image: x grows to the right, y grows UP from the
    bottom of the image (so lower < upper).

    Attributes
    ----------
    left : int
        An int describing the position of the left border of the crop's bounding box in the
        original image.
    lower : int
        An int describing the position of the bottom border of the crop's bounding box in
        the original image.
    right : int
        An int describing the position of the right border of the crop's bounding box in the
        original image.
    upper : int
        An int describing the position of the top border of the crop's bounding box in the
        original image.
    width : int
        The width of the crop (right - left).
    height : int
        The height of the crop (upper - lower).
    horizontal_center : float
        The x coordinate of the crop's center, (left + right) / 2.
    vertical_center : float
        The y coordinate of the crop's center, (lower + upper) / 2.

    Methods
    -------
    find(object_name: str) -> list[ImagePatch]
        Returns a list of new ImagePatch objects containing crops of the image centered
        around any objects found in the image matching the object_name.
    exists(object_name: str) -> bool
        Returns True if the object specified by object_name is found in the image, and
        False otherwise.
    verify_property(object_name: str, attribute: str) -> bool
        Returns True if the object possesses the property, and False otherwise.
    best_text_match(option_list: list[str]) -> str
        Returns the string that best matches the image.
    simple_query(question: str = None) -> str
        Returns the answer to a basic question asked about the image.
    compute_depth() -> float
        Returns the median depth of the image crop.
    crop(left: int, lower: int, right: int, upper: int) -> ImagePatch
        Returns a new ImagePatch object containing a crop of the image at the given
        coordinates.
    overlaps_with(left: int, lower: int, right: int, upper: int) -> bool
        Returns True if the crop overlaps with the given box.
    llm_query(question: str, long_answer: bool = True) -> str
        Answers a text question using a large language model.
    """

    def __init__(
        self,
        image: Any,
        left: int | None = None,
        lower: int | None = None,
        right: int | None = None,
        upper: int | None = None,
    ) -> None:
        """Initializes an ImagePatch object by cropping the image at the given coordinates
        and stores the coordinates as attributes. If no coordinates are provided, the image
        is left unmodified, and the coordinates are set to the dimensions of the image.

        Parameters
        ----------
        image : the image given to execute_command(image), or another ImagePatch
        left, lower, right, upper : int, optional
            A box relative to ``image`` (y up from its bottom), as for ``crop``.

        Examples
        --------
        >>> image_patch = ImagePatch(image)
        >>> top_half = ImagePatch(image, 0, image_patch.height // 2, image_patch.width,
        ...                       image_patch.height)
        """
        if not isinstance(image, ImagePatch):
            raise TypeError(
                "ImagePatch(image): image must be the image passed to execute_command "
                "or another ImagePatch"
            )
        coords = (left, lower, right, upper)
        if all(c is None for c in coords):
            self._ref, self._box = image._ref, image._box
        elif any(c is None for c in coords):
            raise TypeError("ImagePatch(image, left, lower, right, upper): give all four or none")
        else:
            p = image.crop(left, lower, right, upper)
            self._ref, self._box = p._ref, p._box

    @classmethod
    def _at(cls, ref: _ImageRef, box: tuple[int, int, int, int] | None) -> ImagePatch:
        p = cls.__new__(cls)
        p._ref, p._box = ref, box
        return p

    # ------------------------------------------------------------------ geometry
    def _bounds(self) -> tuple[int, int, int, int]:
        if self._box is None:
            w, h = self._ref.size()
            return (0, 0, w, h)
        return self._box

    @property
    def left(self) -> int:
        return self._bounds()[0]

    @property
    def lower(self) -> int:
        return self._bounds()[1]

    @property
    def right(self) -> int:
        return self._bounds()[2]

    @property
    def upper(self) -> int:
        return self._bounds()[3]

    @property
    def width(self) -> int:
        b = self._bounds()
        return b[2] - b[0]

    @property
    def height(self) -> int:
        b = self._bounds()
        return b[3] - b[1]

    @property
    def horizontal_center(self) -> float:
        b = self._bounds()
        return (b[0] + b[2]) / 2

    @property
    def vertical_center(self) -> float:
        b = self._bounds()
        return (b[1] + b[3]) / 2

    def __repr__(self) -> str:
        return "ImagePatch(left={}, lower={}, right={}, upper={})".format(*self._bounds())

    def __eq__(self, other: object) -> bool:
        # Same image and same box: patches found by two different calls compare equal.
        if not isinstance(other, ImagePatch):
            return NotImplemented
        return self._ref is other._ref and self._box == other._box

    def __hash__(self) -> int:
        return hash(self._box)

    # ------------------------------------------------------------------ tool ops
    def _call(self, op: str, args: dict[str, Any]) -> Any:
        box = list(self._box) if self._box is not None else None
        return self._ref.call(op, box, args)

    def find(self, object_name: str) -> list[ImagePatch]:
        """Returns a list of ImagePatch objects matching object_name contained in the crop
        if any are found. Otherwise, returns an empty list. The list is sorted from left to
        right.

        Parameters
        ----------
        object_name : str
            the name of the object to be found, e.g. "circle", "red square", "large shape"

        Returns
        -------
        List[ImagePatch]
            a list of ImagePatch objects matching object_name contained in the crop

        Examples
        --------
        >>> # return the foo
        >>> def execute_command(image) -> List[ImagePatch]:
        >>>     image_patch = ImagePatch(image)
        >>>     foo_patches = image_patch.find("foo")
        >>>     return foo_patches
        """
        boxes = self._call("find", {"name": str(object_name)})
        return [ImagePatch._at(self._ref, tuple(int(v) for v in b)) for b in boxes]

    def exists(self, object_name: str) -> bool:
        """Returns True if the object specified by object_name is found in the image, and
        False otherwise.

        Parameters
        ----------
        object_name : str
            A string describing the name of the object to be found in the image.

        Examples
        --------
        >>> # Are there both foos and garply bars in the photo?
        >>> def execute_command(image)->str:
        >>>     image_patch = ImagePatch(image)
        >>>     is_foo = image_patch.exists("foo")
        >>>     is_garply_bar = image_patch.exists("garply bar")
        >>>     return bool_to_yesno(is_foo and is_garply_bar)
        """
        return bool(self._call("exists", {"name": str(object_name)}))

    def verify_property(self, object_name: str, attribute: str) -> bool:
        """Returns True if the object possesses the property, and False otherwise.
        Differs from 'exists' in that it presupposes the existence of the object specified
        by object_name, instead checking whether the object possesses the property.

        Parameters
        -------
        object_name : str
            A string describing the name of the object to be found in the image.
        attribute : str
            A string describing the property to be checked, e.g. a color or a size.

        Examples
        -------
        >>> # Do the letters have blue color?
        >>> def execute_command(image) -> str:
        >>>     image_patch = ImagePatch(image)
        >>>     letters_patches = image_patch.find("letters")
        >>>     # Question assumes only one letter patch
        >>>     if len(letters_patches) == 0:
        >>>         # If no letters are found, query the image directly
        >>>         return image_patch.simple_query("Do the letters have blue color?")
        >>>     return bool_to_yesno(letters_patches[0].verify_property("letters", "blue"))
        """
        args = {"name": str(object_name), "prop": str(attribute)}
        return bool(self._call("verify_property", args))

    def best_text_match(self, option_list: list[str], prefix: str | None = None) -> str:
        """Returns the string that best matches the image.

        Parameters
        -------
        option_list : List[str]
            A list with the names of the different options
        prefix : str
            A string with the prefixes to append to the options

        Examples
        -------
        >>> # Is the cap gold or white?
        >>> def execute_command(image)->str:
        >>>     image_patch = ImagePatch(image)
        >>>     cap_patches = image_patch.find("cap")
        >>>     # Question assumes one cap patch
        >>>     if len(cap_patches) == 0:
        >>>         # If no cap is found, query the image directly
        >>>         return image_patch.simple_query("Is the cap gold or white?")
        >>>     return cap_patches[0].best_text_match(["gold", "white"])
        """
        if isinstance(option_list, str):
            option_list = [option_list]
        options = [str(o) for o in option_list]
        if not options:
            raise ValueError("best_text_match needs at least one option")
        sent = [f"{prefix} {o}" for o in options] if prefix else options
        best = self._call("best_text_match", {"options": sent})
        return options[sent.index(best)] if best in sent else str(best)

    def simple_query(self, question: str | None = None) -> str:
        """Returns the answer to a basic question asked about the image. If no question is
        provided, returns the answer to "What is this?". The questions are about basic
        perception, and are not meant to be used for complex reasoning or external
        knowledge.

        Parameters
        -------
        question : str
            A string describing the question to be asked.

        Examples
        -------
        >>> # Which kind of baz is not fredding?
        >>> def execute_command(image) -> str:
        >>>     image_patch = ImagePatch(image)
        >>>     baz_patches = image_patch.find("baz")
        >>>     for baz_patch in baz_patches:
        >>>         if not baz_patch.verify_property("baz", "fredding"):
        >>>             return baz_patch.simple_query("What is this baz?")

        >>> # What color is the foo?
        >>> def execute_command(image) -> str:
        >>>     image_patch = ImagePatch(image)
        >>>     foo_patches = image_patch.find("foo")
        >>>     foo_patch = foo_patches[0]
        >>>     return foo_patch.simple_query("What is the color?")
        """
        q = "What is this?" if question is None else str(question)
        return str(self._call("simple_query", {"question": q}))

    def compute_depth(self) -> float:
        """Returns the median depth of the image crop (smaller means closer to the camera).

        Returns
        -------
        float
            the median depth of the image crop

        Examples
        --------
        >>> # the bar furthest away
        >>> def execute_command(image)->ImagePatch:
        >>>     image_patch = ImagePatch(image)
        >>>     bar_patches = image_patch.find("bar")
        >>>     bar_patches.sort(key=lambda bar: bar.compute_depth())
        >>>     return bar_patches[-1]
        """
        return float(self._call("compute_depth", {}))

    def crop(self, left: int, lower: int, right: int, upper: int) -> ImagePatch:
        """Returns a new ImagePatch containing a crop of this patch. The coordinates are
        relative to this patch's own bottom-left corner (for the whole image, that is the
        image's bottom-left corner) and are clipped to the patch.

        Parameters
        -------
        left, lower, right, upper : int
            The box to crop (y up from the patch's bottom).

        Examples
        -------
        >>> # What is to the left of the foo?
        >>> def execute_command(image) -> str:
        >>>     image_patch = ImagePatch(image)
        >>>     foo_patch = image_patch.find("foo")[0]
        >>>     left_part = image_patch.crop(0, 0, foo_patch.left, image_patch.height)
        >>>     return left_part.simple_query("What is this?")
        """
        args = {
            "left": _num(left, "left"),
            "lower": _num(lower, "lower"),
            "right": _num(right, "right"),
            "upper": _num(upper, "upper"),
        }
        box = self._call("crop", args)
        return ImagePatch._at(self._ref, tuple(int(v) for v in box))

    def overlaps_with(self, left: int, lower: int, right: int, upper: int) -> bool:
        """Returns True if a crop with the given coordinates (in the original image)
        overlaps with this one, else False.

        Parameters
        ----------
        left, lower, right, upper : int
            The box to compare with.

        Examples
        --------
        >>> # black foo on top of the qux
        >>> def execute_command(image) -> ImagePatch:
        >>>     image_patch = ImagePatch(image)
        >>>     qux_patch = image_patch.find("qux")[0]
        >>>     foo_patches = image_patch.find("black foo")
        >>>     for foo in foo_patches:
        >>>         if foo.vertical_center > qux_patch.vertical_center:
        >>>             return foo
        """
        a = self._bounds()
        return a[0] <= right and a[2] >= left and a[1] <= upper and a[3] >= lower

    def llm_query(self, question: str, long_answer: bool = True) -> str:
        """Answers a text question using a large language model (general knowledge, no
        image). Use long_answer=False for a short answer of one to three words.

        Examples
        --------
        >>> # What is the city this building is in?
        >>> def execute_command(image) -> str:
        >>>     image_patch = ImagePatch(image)
        >>>     building_name = image_patch.simple_query("What is the name of the building?")
        >>>     return image_patch.llm_query(f"What city is {building_name} in?",
        ...                                  long_answer=False)
        """
        args = {"question": str(question), "long_answer": bool(long_answer)}
        return str(self._call("llm_query", args))


# ----------------------------------------------------------------------------- helpers


def best_image_match(
    list_patches: list[ImagePatch], content: list[str], return_index: bool = False
) -> ImagePatch | int | None:
    """Returns the patch most likely to contain the content.

    Parameters
    ----------
    list_patches : List[ImagePatch]
    content : List[str]
        the object of interest
    return_index : bool
        if True, returns the index of the patch most likely to contain the object

    Returns
    -------
    int
        Patch most likely to contain the object

    Examples
    --------
    >>> # Return the man with the hat
    >>> def execute_command(image):
    >>>     image_patch = ImagePatch(image)
    >>>     man_patches = image_patch.find("man")
    >>>     if len(man_patches) == 0:
    >>>         return image_patch
    >>>     hat_man = best_image_match(list_patches=man_patches, content=["hat"])
    >>>     return hat_man
    """
    patches = list(list_patches)
    if not patches:
        return None
    if not all(isinstance(p, ImagePatch) for p in patches):
        raise TypeError("best_image_match: list_patches must be ImagePatch objects")
    if any(p._ref is not patches[0]._ref for p in patches):
        raise ValueError("best_image_match: the patches must come from the same image")
    texts = [content] if isinstance(content, str) else [str(c) for c in content]
    boxes = [list(p._box) if p._box is not None else None for p in patches]
    idx = int(patches[0]._ref.call("best_image_match", None, {"boxes": boxes, "content": texts}))
    return idx if return_index else patches[idx]


def distance(patch_a: ImagePatch | float, patch_b: ImagePatch | float) -> float:
    """Returns the distance between the edges of two ImagePatches, or between two floats.
    If the patches overlap, it returns a negative distance corresponding to the negative
    intersection over union.

    Parameters
    ----------
    patch_a : ImagePatch
    patch_b : ImagePatch

    Examples
    --------
    # Return the qux that is closest to the foo
    >>> def execute_command(image):
    >>>     image_patch = ImagePatch(image)
    >>>     qux_patches = image_patch.find('qux')
    >>>     foo_patches = image_patch.find('foo')
    >>>     foo_patch = foo_patches[0]
    >>>     qux_patches.sort(key=lambda x: distance(x, foo_patch))
    >>>     return qux_patches[0]
    """
    if isinstance(patch_a, ImagePatch) and isinstance(patch_b, ImagePatch):
        a, b = patch_a._bounds(), patch_b._bounds()
        dx = max(0, a[0] - b[2], b[0] - a[2])
        dy = max(0, a[1] - b[3], b[1] - a[3])
        dist = math.hypot(dx, dy)
        if dist == 0:  # touching or overlapping: -IoU, so more overlap is "closer"
            iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            return -inter / union if union > 0 else 0.0
        return dist
    if isinstance(patch_a, ImagePatch) or isinstance(patch_b, ImagePatch):
        raise TypeError("distance: give two ImagePatches or two numbers")
    return abs(float(patch_a) - float(patch_b))


def bool_to_yesno(bool_answer: bool) -> str:
    """Returns a yes/no answer to a question based on the boolean value of bool_answer.

    Parameters
    ----------
    bool_answer : bool
        a boolean value

    Returns
    -------
    str
        a yes/no answer to a question based on the boolean value of bool_answer
    """
    return "yes" if bool_answer else "no"


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


def coerce_to_numeric(string: Any, no_string: bool = False) -> Any:
    """Converts a string to a number (int when whole, else float): the first number in it,
    digits or an English word up to "twenty" ("3 apples" -> 3, "three" -> 3, "1,200" ->
    1200, "2.5" -> 2.5). If there is no number, returns the string unchanged (or raises
    ValueError when no_string is True).

    Examples
    --------
    >>> # How many more foos than bars?
    >>> def execute_command(image) -> str:
    >>>     image_patch = ImagePatch(image)
    >>>     n_foo = coerce_to_numeric(image_patch.simple_query("How many foos are there?"))
    >>>     n_bar = len(image_patch.find("bar"))
    >>>     return str(n_foo - n_bar)
    """
    if isinstance(string, bool):
        return int(string)
    if isinstance(string, (int, float)):
        return string
    text = str(string)
    m = re.search(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)", text)
    if m:
        num = float(m.group(0).replace(",", ""))
        return int(num) if num.is_integer() else num
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in _NUMBER_WORDS:
            return _NUMBER_WORDS[w]
    if no_string:
        raise ValueError(f"no number in {text[:80]!r}")
    return string


# ----------------------------------------------------------------------------- namespace


def make_image_handle(caller: ToolCaller, index: int = 0) -> ImagePatch:
    """The ``image`` passed to ``execute_command(image)``: the whole-image patch.

    It is an :class:`ImagePatch` itself, so ``ImagePatch(image)`` (the ViperGPT idiom) and
    ``image.find(...)`` both work. Its size is asked of the tool server only if a program
    uses the whole image's coordinates. ``index``: which of the question's images (0 is
    the first, or NLVR2's left; 1 the right).
    """
    return ImagePatch._at(_ImageRef(caller, index), None)


def answer_text(value: Any) -> str | None:
    """A program's return value as answer text (None when it is not an answer)."""
    if isinstance(value, bool):
        return bool_to_yesno(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return ", ".join(answer_text(v) or "" for v in value)
    return None
