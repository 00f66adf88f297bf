"""Training prompts: GSM8K questions plus prompts made here from templates and topics.

The made prompts cover what a chat model is asked in practice (explanations, advice, writing,
emails, code, summaries, rewrites, comparisons, role play), so that the head sees the
target's own answers to every kind of request. Everything is deterministic: the same seed
gives the same prompts in the same order.

Benchmark prompts (MT-bench, HumanEval) are never read here: they only measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product
from pathlib import Path

from aerie.bench.prompts import jsonl_objects
from aerie.errors import InputError
from aerie.train import synthetic


@dataclass(frozen=True)
class TrainPrompt:
    id: str
    kind: str
    text: str


# --- vocabularies --------------------------------------------------------------------------

TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "inflation", "machine learning", "the French Revolution",
    "climate change", "vaccines", "blockchain", "the immune system", "plate tectonics", "supply and demand",
    "compound interest", "the Renaissance", "quantum computing", "the internet", "electric cars", "sleep",
    "meditation", "volcanoes", "recycling", "the stock market", "DNA", "gravity", "the Roman Empire",
    "renewable energy", "neural networks", "the human heart", "earthquakes", "the printing press",
    "democracy", "the moon landing", "antibiotics", "ocean tides", "the greenhouse effect", "evolution",
    "the Industrial Revolution", "credit scores", "solar panels", "the periodic table", "rainbows",
    "the Silk Road", "cloud computing", "encryption", "the speed of light", "bees and pollination",
    "the Cold War", "habits", "the scientific method", "taxes", "the placebo effect", "coral reefs",
    "nuclear fusion", "the brain", "interest rates", "open source software", "the Great Wall of China",
    "weather forecasting", "the Olympic Games", "music theory", "opportunity cost", "the nitrogen cycle",
    "viruses", "the Big Bang", "public speaking", "time zones", "the Pythagorean theorem", "probability",
    "compilers", "operating systems", "databases", "the electoral college", "ancient Egypt", "the Moon",
    "batteries", "magnets", "friction", "the food chain", "deserts", "rain forests", "glaciers",
    "the human skeleton", "calories", "vitamins", "the digestive system", "jazz", "impressionist painting",
    "the Olympic torch relay", "photography", "version control", "recursion", "sorting algorithms",
    "the Fibonacci sequence", "prime numbers", "statistics", "the Internet of Things", "3D printing",
    "self-driving cars", "social media", "remote work", "minimalism", "stoicism", "the Mars rovers",
    "the International Space Station", "hurricanes", "wind turbines", "the metric system", "banking",
    "insurance", "entrepreneurship", "marketing", "negotiation", "time management", "first aid",
    "the history of chess", "origami", "bread baking", "coffee roasting", "composting", "bird migration",
)

AUDIENCES = ("a ten-year-old", "a high school student", "a complete beginner", "a busy manager", "a retired teacher")

EXPLAIN_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "What is {topic}? Give an example.",
    "Explain {topic} to {audience}.",
    "Why is {topic} important?",
    "Give me three key facts about {topic}.",
    "What are common misconceptions about {topic}?",
    "How does {topic} work?",
    "Write a short paragraph describing the history of {topic}.",
    "What should everyone know about {topic}?",
    "Describe {topic} in five sentences.",
    "Can you teach me the basics of {topic}?",
    "What questions do scientists still have about {topic}?",
)

GOALS = (
    "improve my sleep", "learn a new language", "save money for a trip", "prepare for a job interview",
    "start running", "stay focused while studying", "make new friends in a new city", "cook healthier meals",
    "read more books", "get better at public speaking", "keep my house tidy", "learn to play the guitar",
    "start a small online business", "reduce my screen time", "become a better writer", "learn to code",
    "plan a birthday party", "train my dog", "grow vegetables on a balcony", "manage stress at work",
    "negotiate a higher salary", "build a daily exercise routine", "pay off my debt", "learn to draw",
    "become more confident", "improve my memory", "wake up earlier", "write a novel", "prepare for a marathon",
    "organize my email inbox", "keep a journal", "drink more water", "learn photography", "be more productive",
    "plan a road trip", "study for a math exam", "take better notes", "learn to swim", "start investing",
    "make my resume stand out", "lead a team meeting", "give constructive feedback", "deal with a difficult coworker",
    "volunteer in my community", "reduce food waste", "travel on a budget", "learn chess", "start a podcast",
    "teach my kids about money", "move to a new apartment",
)

ADVICE_TEMPLATES = (
    "How can I {goal}?",
    "Give me five tips to {goal}.",
    "I want to {goal}. Where should I start?",
    "What are the biggest mistakes people make when they try to {goal}?",
    "Make a one-week plan to help me {goal}.",
    "My friend wants to {goal}. What advice would you give?",
    "List the steps I should follow to {goal}.",
)

FORMS = (
    "a short poem", "a haiku", "a limerick", "a short story", "the opening paragraph of a blog post",
    "a product description", "a persuasive paragraph", "a thank-you note", "a short motivational speech",
    "a news headline and a two-sentence summary", "a diary entry", "a dialogue between two friends",
    "a fairy tale", "a song chorus", "a riddle", "a movie plot summary", "a restaurant review", "an advertisement",
)

SUBJECTS = (
    "a rainy afternoon", "a lost dog finding its way home", "the first day of school", "a lighthouse keeper",
    "a robot learning to paint", "autumn leaves", "a busy market", "a city at night", "a mountain village",
    "a friendship between a cat and a bird", "a new coffee shop", "a summer festival", "an old library",
    "a journey across the desert", "the last day of winter", "a pair of running shoes", "a time traveler",
    "a small bakery", "the ocean", "a garden in spring", "a forgotten letter", "a spaceship crew",
    "a grandmother's recipe", "a school science fair", "a snowy forest", "a musician on the street",
    "a lost key", "a train ride", "a kind stranger", "a clever fox", "a hot air balloon", "a bicycle",
    "a thunderstorm", "a smart watch", "a dragon who is afraid of fire", "learning to ride a bike",
    "a rooftop garden", "a detective's first case", "a quiet beach", "a football match",
)

WRITING_TEMPLATES = (
    "Write {form} about {subject}.",
    "Please write {form} about {subject}.",
    "Could you write {form} about {subject}? Keep it short.",
    "Write {form} about {subject} for children.",
)

RECIPIENTS = ("my manager", "a customer", "my landlord", "a professor", "a colleague", "a friend", "a new client", "my team")

PURPOSES = (
    "asking for a day off", "apologizing for a late reply", "requesting a meeting next week",
    "thanking them for their help", "asking for feedback on a report", "announcing a project delay",
    "inviting them to a dinner", "following up on an unpaid invoice", "reporting a broken heater",
    "asking for a recommendation letter", "introducing myself", "declining an invitation politely",
    "sharing the results of a survey", "proposing a new idea", "confirming an appointment",
)

EMAIL_TEMPLATES = (
    "Write a short email to {recipient} {purpose}.",
    "Draft a polite message to {recipient} {purpose}.",
    "Help me write an email to {recipient} {purpose}.",
)

# (signature, description) pairs for code prompts; the descriptions read after "that".
CODE_TASKS = (
    ("reverse_words(sentence: str) -> str", "reverses the order of the words in a sentence"),
    ("is_palindrome(text: str) -> bool", "checks whether a string is a palindrome, ignoring case and spaces"),
    ("count_vowels(text: str) -> int", "counts the vowels in a string"),
    ("fizzbuzz(n: int) -> list[str]", "returns the FizzBuzz sequence from 1 to n"),
    ("factorial(n: int) -> int", "computes the factorial of a non-negative integer"),
    ("fibonacci(n: int) -> list[int]", "returns the first n Fibonacci numbers"),
    ("is_prime(n: int) -> bool", "checks whether a number is prime"),
    ("primes_below(n: int) -> list[int]", "returns all prime numbers below n using the sieve of Eratosthenes"),
    ("gcd(a: int, b: int) -> int", "computes the greatest common divisor of two integers"),
    ("lcm(a: int, b: int) -> int", "computes the least common multiple of two integers"),
    ("flatten(nested: list) -> list", "flattens an arbitrarily nested list"),
    ("chunk(items: list, size: int) -> list[list]", "splits a list into chunks of a given size"),
    ("unique_in_order(items: list) -> list", "removes duplicates from a list while keeping the original order"),
    ("merge_sorted(a: list[int], b: list[int]) -> list[int]", "merges two sorted lists into one sorted list"),
    ("binary_search(items: list[int], target: int) -> int", "returns the index of target in a sorted list, or -1"),
    ("bubble_sort(items: list[int]) -> list[int]", "sorts a list with bubble sort"),
    ("quicksort(items: list[int]) -> list[int]", "sorts a list with quicksort"),
    ("merge_sort(items: list[int]) -> list[int]", "sorts a list with merge sort"),
    ("word_frequencies(text: str) -> dict[str, int]", "counts how often each word appears in a text"),
    ("most_common_char(text: str) -> str", "returns the most common character in a string"),
    ("is_anagram(a: str, b: str) -> bool", "checks whether two strings are anagrams of each other"),
    ("caesar_cipher(text: str, shift: int) -> str", "encrypts a string with a Caesar cipher"),
    ("celsius_to_fahrenheit(c: float) -> float", "converts a temperature from Celsius to Fahrenheit"),
    ("second_largest(numbers: list[int]) -> int", "returns the second largest number in a list"),
    ("running_sum(numbers: list[int]) -> list[int]", "returns the running sum of a list of numbers"),
    ("transpose(matrix: list[list[int]]) -> list[list[int]]", "transposes a matrix given as a list of rows"),
    ("matrix_multiply(a: list[list[float]], b: list[list[float]]) -> list[list[float]]", "multiplies two matrices"),
    ("rotate_list(items: list, k: int) -> list", "rotates a list to the right by k positions"),
    ("capitalize_words(text: str) -> str", "capitalizes the first letter of every word"),
    ("remove_punctuation(text: str) -> str", "removes all punctuation from a string"),
    ("count_words(text: str) -> int", "counts the words in a string"),
    ("longest_word(text: str) -> str", "returns the longest word in a sentence"),
    ("sum_of_digits(n: int) -> int", "returns the sum of the digits of an integer"),
    ("is_leap_year(year: int) -> bool", "checks whether a year is a leap year"),
    ("days_between(start: str, end: str) -> int", "returns the number of days between two dates given as YYYY-MM-DD"),
    ("valid_parentheses(s: str) -> bool", "checks whether the brackets in a string are balanced"),
    ("roman_to_int(s: str) -> int", "converts a Roman numeral to an integer"),
    ("int_to_roman(n: int) -> str", "converts an integer to a Roman numeral"),
    ("to_binary(n: int) -> str", "converts a non-negative integer to its binary representation"),
    ("from_binary(bits: str) -> int", "converts a binary string to an integer"),
    ("two_sum(numbers: list[int], target: int) -> tuple[int, int]", "finds two indices whose values add up to target"),
    ("max_subarray_sum(numbers: list[int]) -> int", "returns the largest sum of a contiguous subarray"),
    ("pairs_with_sum(numbers: list[int], target: int) -> list[tuple[int, int]]", "returns all pairs of numbers that add up to target"),
    ("median(numbers: list[float]) -> float", "returns the median of a list of numbers"),
    ("mode(numbers: list[int]) -> int", "returns the most frequent number in a list"),
    ("variance(numbers: list[float]) -> float", "computes the variance of a list of numbers"),
    ("normalize(numbers: list[float]) -> list[float]", "scales a list of numbers to the range 0 to 1"),
    ("dot_product(a: list[float], b: list[float]) -> float", "computes the dot product of two vectors"),
    ("euclidean_distance(p: tuple[float, float], q: tuple[float, float]) -> float", "computes the distance between two points"),
    ("triangle_area(a: float, b: float, c: float) -> float", "computes the area of a triangle from its side lengths"),
    ("is_power_of_two(n: int) -> bool", "checks whether a number is a power of two"),
    ("count_islands(grid: list[list[int]]) -> int", "counts the islands of ones in a grid"),
    ("shortest_path(graph: dict[str, list[str]], start: str, goal: str) -> list[str]", "finds the shortest path in an unweighted graph with breadth-first search"),
    ("has_cycle(graph: dict[int, list[int]]) -> bool", "checks whether a directed graph has a cycle"),
    ("topological_sort(graph: dict[str, list[str]]) -> list[str]", "returns a topological order of a directed acyclic graph"),
    ("dijkstra(graph: dict[str, dict[str, int]], start: str) -> dict[str, int]", "computes shortest distances from a start node with Dijkstra's algorithm"),
    ("longest_common_prefix(words: list[str]) -> str", "returns the longest common prefix of a list of strings"),
    ("longest_common_subsequence(a: str, b: str) -> int", "returns how long the longest subsequence shared by two strings is"),
    ("edit_distance(a: str, b: str) -> int", "computes the Levenshtein distance between two strings"),
    ("compress(text: str) -> str", "compresses a string with run-length encoding, for example 'aaabb' becomes 'a3b2'"),
    ("decompress(text: str) -> str", "expands a run-length encoded string"),
    ("parse_csv_line(line: str) -> list[str]", "splits one line of CSV text into fields"),
    ("snake_to_camel(name: str) -> str", "converts a snake_case name to camelCase"),
    ("camel_to_snake(name: str) -> str", "converts a camelCase name to snake_case"),
    ("validate_email(address: str) -> bool", "checks whether a string looks like a valid email address"),
    ("extract_numbers(text: str) -> list[int]", "extracts all integers that appear in a string"),
    ("group_by_length(words: list[str]) -> dict[int, list[str]]", "groups words by their length"),
    ("invert_dict(d: dict) -> dict", "swaps the keys and values of a dictionary"),
    ("merge_dicts(a: dict, b: dict) -> dict", "merges two dictionaries, adding the values of shared keys"),
    ("deep_get(d: dict, path: str, default=None)", "reads a value from nested dictionaries using a dotted path"),
    ("top_k(numbers: list[int], k: int) -> list[int]", "returns the k largest numbers in descending order"),
    ("moving_average(values: list[float], window: int) -> list[float]", "computes the moving average of a list"),
    ("count_inversions(numbers: list[int]) -> int", "counts the pairs that are out of order in a list"),
    ("power_set(items: list) -> list[list]", "returns all subsets of a list"),
    ("permutations(items: list) -> list[list]", "returns all permutations of a list"),
    ("n_queens(n: int) -> int", "counts the solutions of the n-queens puzzle"),
    ("coin_change(coins: list[int], amount: int) -> int", "returns the fewest coins that make up an amount, or -1"),
    ("climb_stairs(n: int) -> int", "counts the ways to climb n stairs taking one or two steps at a time"),
    ("knapsack(weights: list[int], values: list[int], capacity: int) -> int", "solves the 0/1 knapsack problem"),
    ("spiral_order(matrix: list[list[int]]) -> list[int]", "returns the elements of a matrix in spiral order"),
    ("is_sorted(items: list) -> bool", "checks whether a list is sorted in ascending order"),
    ("digits_to_words(n: int) -> str", "spells out each digit of a number in English words"),
    ("count_substring(text: str, sub: str) -> int", "counts the overlapping occurrences of a substring"),
    ("find_duplicates(items: list) -> list", "returns the elements that appear more than once"),
    ("missing_number(numbers: list[int]) -> int", "finds the missing number in a list containing 0 to n"),
    ("balance_index(numbers: list[int]) -> int", "finds an index where the sums on both sides are equal"),
    ("next_greater(numbers: list[int]) -> list[int]", "returns, for each element, the next greater element to its right or -1"),
    ("stack_min() -> type", "builds a stack class that returns its minimum in constant time"),
    ("lru_cache_class(capacity: int) -> type", "builds a least-recently-used cache class with get and put methods"),
    ("linked_list_reverse(head)", "reverses a singly linked list"),
    ("tree_height(root) -> int", "returns the height of a binary tree"),
    ("is_bst(root) -> bool", "checks whether a binary tree is a binary search tree"),
    ("level_order(root) -> list[list[int]]", "returns the values of a binary tree level by level"),
    ("char_histogram(text: str) -> str", "prints a text histogram of character counts"),
    ("hex_to_rgb(color: str) -> tuple[int, int, int]", "converts a hex color like '#ff8800' to an RGB tuple"),
    ("seconds_to_hms(seconds: int) -> str", "formats a number of seconds as hours, minutes and seconds"),
    ("truncate(text: str, limit: int) -> str", "shortens a string to a limit and adds '...' when it was cut"),
    ("mask_card_number(number: str) -> str", "masks all but the last four digits of a card number"),
    ("grade(score: int) -> str", "turns a score from 0 to 100 into a letter grade"),
)

CODE_TEMPLATES = (
    "Write a Python function `{sig}` that {desc}.",
    "Implement a Python function that {desc}. Include a short docstring.",
    "Write a function in Python that {desc}, and show an example of how to call it.",
    "Write a JavaScript function that {desc}.",
    "How would you write a Python function that {desc}? Explain your approach.",
    "Write unit tests with pytest for a function that {desc}.",
    "{stub}",
    "Complete the following Python function.\n\n{stub}",
    "Write a Python program that {desc}. Read the input from the user.",
    "Write a C++ function that {desc}.",
    "Write a Rust function that {desc}.",
    "Write a Java method that {desc}.",
    "Here is a function stub. Write the body and explain it.\n\n{stub}",
    "Write an efficient Python solution for this task: a function that {desc}. What is its complexity?",
)

ALGORITHMS = (
    "binary search", "quicksort", "merge sort", "heap sort", "breadth-first search", "depth-first search",
    "Dijkstra's algorithm", "dynamic programming", "a hash table", "a linked list", "a binary search tree",
    "a stack", "a queue", "recursion", "memoization", "the two-pointer technique", "a sliding window",
    "a trie", "union-find", "topological sorting", "a priority queue", "big-O notation", "garbage collection",
    "a REST API", "SQL joins", "regular expressions", "unit testing", "object-oriented programming",
    "functional programming", "Git branching",
)

ALGORITHM_TEMPLATES = (
    "Explain how {alg} works, with a short Python example.",
    "What is {alg} and when should I use it?",
    "What is the time complexity of {alg}? Explain briefly.",
)

COMPARISONS = (
    ("cats", "dogs"), ("tea", "coffee"), ("Python", "JavaScript"), ("renting", "buying a home"),
    ("trains", "planes"), ("books", "movies"), ("summer", "winter"), ("city life", "country life"),
    ("solar power", "wind power"), ("email", "instant messaging"), ("lists", "tuples in Python"),
    ("running", "swimming"), ("working from home", "working in an office"), ("SQL", "NoSQL databases"),
    ("electric cars", "gasoline cars"), ("paper books", "e-books"), ("stocks", "bonds"),
    ("Linux", "Windows"), ("a laptop", "a desktop computer"), ("baking", "frying"),
    ("classical music", "pop music"), ("public schools", "private schools"), ("TCP", "UDP"),
    ("weather", "climate"), ("viruses", "bacteria"), ("mitosis", "meiosis"), ("speed", "velocity"),
    ("a democracy", "a monarchy"), ("saving", "investing"), ("credit cards", "debit cards"),
)

COMPARISON_TEMPLATES = (
    "Compare {a} and {b}.",
    "What are the main differences between {a} and {b}?",
    "Which is better, {a} or {b}? Give arguments for both.",
)

THINGS = (
    "social media", "nuclear power", "online learning", "a four-day work week", "self-driving cars",
    "living abroad", "homeschooling", "cryptocurrency", "artificial intelligence", "fast fashion",
    "video games", "space tourism", "a vegetarian diet", "open-plan offices", "smartphones for children",
    "universal basic income", "tourism", "standardized tests", "working at a startup", "public transport",
)

PROS_CONS_TEMPLATES = (
    "What are the pros and cons of {thing}?",
    "Write a balanced opinion about {thing}.",
)

ROLES = (
    "a pirate captain", "a tour guide in an old European city", "a medieval knight", "a chef", "a detective",
    "a personal trainer", "a librarian", "an astronaut on the Moon", "a museum curator", "a wise old wizard",
    "a sports commentator", "a travel agent", "a gardener", "a history teacher", "a friendly robot",
    "a ship's navigator", "a zookeeper", "a fashion designer", "a farmer", "a customer support agent",
)

ROLE_ASKS = (
    "Introduce yourself.", "Describe a typical day in your life.", "What is the hardest part of your job?",
    "Tell me a story from your past.", "Give me some advice for a beginner.", "What do you love most about your work?",
)

REWRITE_TASKS = (
    "Summarize the following text in one sentence:\n\n{text}",
    "Rewrite the following text in a more formal tone:\n\n{text}",
    "Paraphrase the following text in your own words:\n\n{text}",
    "Turn the following text into a short bulleted list of facts:\n\n{text}",
    "Extract all the numbers in the following text and say what each one refers to:\n\n{text}",
    "Write a short title for the following text:\n\n{text}",
    "Rewrite the following text so that a young child can understand it:\n\n{text}",
    "Identify the people and objects mentioned in the following text:\n\n{text}",
    "Make the following text more concise:\n\n{text}",
)

MATH_STYLE = (
    "{q}",
    "Solve this problem step by step: {q}",
    "{q} Explain your reasoning.",
)


# Knowledge questions across fields: what STEM and humanities questions ask (a concept, how it
# works, why it matters, where it stops holding), longer and more structured than EXPLAIN's.
FIELD_CONCEPTS = {
    "physics": ("Newton's laws of motion", "conservation of energy", "entropy", "electromagnetic induction",
                "the photoelectric effect", "special relativity", "wave-particle duality", "orbital motion",
                "buoyancy", "resonance", "the Doppler effect", "nuclear fission", "semiconductors", "pressure in fluids"),
    "chemistry": ("chemical equilibrium", "acids and bases", "oxidation and reduction", "catalysts",
                  "covalent and ionic bonds", "the mole", "polymers", "electrolysis", "isotopes", "reaction rates",
                  "solubility", "combustion"),
    "biology": ("natural selection", "cell division", "the nervous system", "enzymes", "genetic mutations",
                "ecosystems", "protein synthesis", "homeostasis", "the circulatory system", "symbiosis", "hormones",
                "stem cells", "the immune response"),
    "earth science": ("the rock cycle", "ocean currents", "monsoons", "river deltas", "erosion", "the ozone layer",
                      "continental drift", "biomes", "soil formation", "the carbon cycle"),
    "computer science": ("cache memory", "public-key cryptography", "TCP/IP networking", "virtual memory",
                         "hash functions", "compilers and interpreters", "concurrency and threads", "database indexes",
                         "overfitting in machine learning", "gradient descent", "load balancing", "containers",
                         "garbage collection", "recursion and the call stack"),
    "mathematics": ("derivatives", "integrals", "probability distributions", "matrices", "complex numbers",
                    "proof by induction", "Bayes' theorem", "the central limit theorem", "logarithms", "game theory",
                    "vectors", "exponential growth"),
    "economics": ("GDP", "the Phillips curve", "fiscal policy", "monetary policy",
                  "comparative advantage", "price elasticity", "externalities", "the business cycle", "trade deficits",
                  "behavioral economics", "monopolies", "exchange rates"),
    "history": ("the fall of the Western Roman Empire", "the Meiji Restoration", "the Protestant Reformation",
                "decolonization in Africa", "the Ottoman Empire", "the Age of Exploration", "the First World War",
                "the civil rights movement", "the Mongol Empire", "the Congress of Vienna", "the Black Death",
                "the abolition of slavery"),
    "philosophy": ("utilitarianism", "Kant's categorical imperative", "existentialism", "the social contract",
                   "free will and determinism", "empiricism and rationalism", "Plato's allegory of the cave",
                   "virtue ethics", "the problem of induction", "the mind-body problem"),
    "psychology": ("cognitive dissonance", "classical conditioning", "Maslow's hierarchy of needs", "growth mindset",
                   "short-term and long-term memory", "intrinsic motivation", "emotional intelligence",
                   "the bystander effect", "anchoring", "procrastination"),
    "law and government": ("the separation of powers", "the rule of law", "federalism", "intellectual property",
                           "freedom of speech", "judicial review", "data protection law", "international treaties"),
    "the arts": ("the hero's journey", "tragedy in Shakespeare's plays", "symbolism in poetry", "Baroque music",
                 "modernist architecture", "film noir", "perspective in Renaissance painting", "jazz improvisation",
                 "the sonnet", "color theory"),
}

FIELD_TEMPLATES = (
    "In {field}, what is {concept}? Explain it with an example.",
    "Explain {concept} and how it shows up in everyday life.",
    "What is {concept}, and what are its limits?",
    "Write a short essay on {concept}.",
    "Give an overview of {concept}: the main idea, how it was discovered or developed, and why it matters in {field}.",
    "Describe {concept} step by step.",
    "How would you explain {concept} to {audience}? Write the explanation.",
    "List five key ideas about {concept}, with a short explanation of each.",
    "What are the main debates or open questions about {concept}?",
    "Name an idea in {field} that is often confused with {concept}, and explain the difference.",
    "What are common mistakes students make when learning about {concept}?",
    "Describe a real-world case in which {concept} plays a part, and analyse it.",
)

# Plans, scripts and structured pieces of writing built around a subject.
GRADES = ("grade 5", "grade 8", "grade 10", "first-year university")
PROJECTS = (
    "building a community garden", "launching a mobile app", "organizing a charity run", "renovating a kitchen",
    "setting up a small library", "designing a rainwater collection system", "running a school science fair",
    "moving a small company's files to the cloud", "opening a neighborhood cafe", "planning a hiking trip for twelve people",
    "creating an online course", "reducing the energy use of an office building", "starting a recycling program at school",
    "organizing a local film festival",
)
EVENTS = ("a wedding for 80 guests", "a company retreat", "a week-long family holiday", "a school trip to a museum",
          "a small music festival", "a product launch party", "a hackathon", "a book club's first year")
IDEAS = ("a film about a town rebuilding after a flood", "an app that helps people share tools with neighbors",
         "a podcast about the history of food", "a board game that teaches economics", "a museum for children",
         "a bike-sharing program for a small town", "a newsletter about local science", "a documentary about coral reefs")
FIGURES = ("Hypatia", "Marie Curie", "Leonardo da Vinci", "Ada Lovelace", "Isaac Newton", "Confucius",
           "Abraham Lincoln", "Charles Darwin", "Jane Austen", "Nikola Tesla", "Frida Kahlo", "Galileo Galilei")
MODERN = ("a software engineer", "a climate scientist", "a high school student", "a startup founder", "a doctor",
          "a journalist")
TASK_TEMPLATES = (
    "Create a lesson plan about {concept} for {grade} students: two lessons of 50 minutes each.",
    "Break {project} into phases and describe what happens in each.",
    "Write a short video script that explains {concept}.",
    "Suggest five activities that help {audience} understand {concept}, with a brief description of each.",
    "How would you go about {project}? Give a plan with rough costs.",
    "Prepare a budget for {event}, with estimated costs for each item.",
    "Write a persuasive pitch for {idea}.",
    "Imagine {figure} meeting {modern} today. Write their conversation about {concept}.",
    "Make a checklist for {project}.",
    "Outline a presentation on {concept} in ten slides, with one sentence per slide.",
)

# Short programs for the reviewing prompts: some correct, some with a bug to find.
SNIPPETS = (
    "def average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n    return total / len(numbers) - 1",
    "def find_max(items):\n    best = 0\n    for x in items:\n        if x > best:\n            best = x\n    return best",
    "def is_even(n):\n    return n % 2 == 1",
    "def reverse(s):\n    out = ''\n    for i in range(len(s) - 1, 0, -1):\n        out += s[i]\n    return out",
    "def count_words(text):\n    counts = {}\n    for word in text.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
    "def binary_search(a, x):\n    lo, hi = 0, len(a)\n    while lo < hi:\n        mid = (lo + hi) // 2\n        if a[mid] < x:\n            lo = mid\n        else:\n            hi = mid\n    return lo",
    "def append_item(item, items=[]):\n    items.append(item)\n    return items",
    "def fib(n):\n    if n <= 1:\n        return n\n    return fib(n - 1) + fib(n - 2)",
    "def dedupe(items):\n    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out",
    "def read_numbers(path):\n    f = open(path)\n    numbers = [int(line) for line in f]\n    return sum(numbers)",
    "def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out",
    "def celsius(f):\n    return f - 32 * 5 / 9",
    "function sum(arr) {\n  let total;\n  for (let i = 0; i <= arr.length; i++) {\n    total += arr[i];\n  }\n  return total;\n}",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id;",
)
SNIPPET_TEMPLATES = (
    "Is this code correct? If not, explain the problem and fix it.\n\n```\n{code}\n```",
    "Explain what this code does, line by line.\n\n```\n{code}\n```",
    "Review the following code and suggest improvements.\n\n```\n{code}\n```",
    "Write unit tests for this code.\n\n```\n{code}\n```",
    "Rewrite this code in another programming language of your choice.\n\n```\n{code}\n```",
    "What is the time complexity of this code, and can it be made faster?\n\n```\n{code}\n```",
)
SQL_TASKS = (
    "lists the ten customers who spent the most", "counts the orders placed in each month of 2023",
    "finds the customers who have never placed an order", "returns the average order amount per city",
    "finds the most popular product in each category", "lists the orders larger than the customer's average order",
    "deletes duplicate customer rows and keeps the oldest one", "shows each customer's first and latest order dates",
    "computes the running total of sales by day", "finds the cities with more than fifty customers",
)
SQL_SCHEMA = ("customers(id, name, city, created_at), orders(id, customer_id, product_id, amount, created_at) "
              "and products(id, name, category, price)")
WEB_TASKS = (
    "a button that changes the background color when clicked", "a contact form that checks the email address",
    "a to-do list where items can be added and removed", "a countdown timer to New Year's Day",
    "a navigation bar that collapses on small screens", "an image gallery with a lightbox",
    "a dark mode toggle", "a table that can be sorted by clicking its headers", "a simple calculator",
    "a page that fetches and displays the current weather from an API",
)
SHELL_TASKS = (
    "finds the ten largest files under a directory", "renames every .jpeg file in a folder to .jpg",
    "backs up a directory into a dated tar.gz archive", "counts the lines of code in all Python files of a project",
    "checks whether a website is up every minute and logs failures", "deletes log files older than thirty days",
    "prints the number of lines, words and characters of each file in a folder", "monitors disk usage and warns above 90 percent",
)
MORE_LANGUAGES = ("Go", "TypeScript", "C#", "Kotlin", "Swift", "Ruby", "PHP")

# Reading prompts: a made-up passage (aerie.train.synthetic) and a request about it.
READING_TASKS = {
    "people": (
        "Extract the name, age, job and city of every person in the text below. Answer in JSON.\n\n{text}",
        "List the people mentioned below with their jobs, one per line, in the format \"name, job\".\n\n{text}",
        "Who is the oldest and who is the youngest person in the following text?\n\n{text}",
        "Turn the following text into a Markdown table with the columns Name, Age, Job and City.\n\n{text}",
        "Where does each person below live, and what is the main language spoken there?\n\n{text}",
    ),
    "companies": (
        "Which of the companies below kept the most money as profit, and who runs it?\n\n{text}",
        "Which company below has the highest profit margin (profit divided by revenue)? Show your calculation.\n\n{text}",
        "Extract each company's name, CEO, revenue and profit from the text below as CSV.\n\n{text}",
        "Rank the companies below by revenue, from highest to lowest.\n\n{text}",
    ),
    "reviews": (
        "Score each review below from 1 (hated it) to 5 (loved it), and explain each score in a few words.\n\n{text}",
        "Classify each review below as positive, negative or mixed, and give a one-line reason for each.\n\n{text}",
        "What do the following reviews praise, and what do they criticize?\n\n{text}",
    ),
    "table": (
        "Given the following sales records, find the month with the highest revenue for each product.\n\n{text}",
        "Compute the total units sold per region from the following data.\n\n{text}",
        "Describe the trend in the following data in a short paragraph.\n\n{text}",
        "Convert the following CSV data to JSON.\n\n{text}",
        "For each product in the data below, give its best and worst month by units sold.\n\n{text}",
    ),
    "news": (
        "Find every person, organization and place named in the article below and sort them into three lists.\n\n{text}",
        "Write a headline for the following article, then summarize it in two sentences.\n\n{text}",
        "List the facts and figures in the following article as bullet points.\n\n{text}",
        "Who are the people in this article, and what is each one's role?\n\n{text}",
    ),
}


# --- assembling -----------------------------------------------------------------------------


def read_gsm8k(path: str | Path) -> list[str]:
    """GSM8K training questions (field `question`), in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GSM8K file '{path}' does not exist")
    questions = []
    for lineno, row in jsonl_objects(path):
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{path}:{lineno}: needs a non-empty string 'question'")
        questions.append(q.strip())
    return questions


def _stub(sig: str, desc: str) -> str:
    doc = desc[0].upper() + desc[1:] + "."
    return f'def {sig}:\n    """{doc}\n    """\n'


def _take(rng: random.Random, pool: list[str], n: int) -> list[str]:
    if n >= len(pool):
        return list(pool)
    return rng.sample(pool, n)


def made_prompts(passages: list[str], seed: int = 0, scale: float = 1.0) -> list[TrainPrompt]:
    """Prompts from templates x topics and made-up passages, about 12,700 at scale 1.
    `passages` are short texts (GSM8K questions serve well) for the summary and rewrite
    prompts."""
    rng = random.Random(seed)
    out: list[TrainPrompt] = []

    def add(kind: str, texts: list[str], n: int) -> None:
        for i, text in enumerate(_take(rng, sorted(set(texts)), max(1, int(n * scale)))):
            out.append(TrainPrompt(id=f"{kind}-{i}", kind=kind, text=text))

    add("explain", [t.format(topic=topic, audience=a) for t, topic, a in product(EXPLAIN_TEMPLATES, TOPICS, AUDIENCES)], 1300)
    add("advice", [t.format(goal=g) for t, g in product(ADVICE_TEMPLATES, GOALS)], 330)
    add("writing", [t.format(form=f, subject=s) for t, f, s in product(WRITING_TEMPLATES, FORMS, SUBJECTS)], 900)
    add("email", [t.format(recipient=r, purpose=p) for t, r, p in product(EMAIL_TEMPLATES, RECIPIENTS, PURPOSES)], 300)
    code = [t.format(sig=sig, desc=desc, stub=_stub(sig, desc)) for t, (sig, desc) in product(CODE_TEMPLATES, CODE_TASKS)]
    add("code", code, 1400)
    add("algorithm", [t.format(alg=a) for t, a in product(ALGORITHM_TEMPLATES, ALGORITHMS)], 90)
    add("compare", [t.format(a=a, b=b) for t, (a, b) in product(COMPARISON_TEMPLATES, COMPARISONS)], 90)
    add("opinion", [t.format(thing=x) for t, x in product(PROS_CONS_TEMPLATES, THINGS)], 40)
    add("roleplay", [f"Pretend you are {r}. {a}" for r, a in product(ROLES, ROLE_ASKS)], 120)
    rewrite = [t.format(text=p) for t, p in zip(REWRITE_TASKS * (len(passages) // len(REWRITE_TASKS) + 1), passages)]
    add("rewrite", rewrite, 1200)
    concepts = [(field, c) for field, cs in FIELD_CONCEPTS.items() for c in cs]
    add("field", [t.format(field=f, concept=c, audience=a)
                  for t, (f, c), a in product(FIELD_TEMPLATES, concepts, AUDIENCES[:2])], 1800)
    tasks = [t.format(concept=c, grade=rng.choice(GRADES), project=rng.choice(PROJECTS), event=rng.choice(EVENTS),
                      idea=rng.choice(IDEAS), figure=rng.choice(FIGURES), modern=rng.choice(MODERN),
                      audience=rng.choice(AUDIENCES))
             for t, (_, c) in product(TASK_TEMPLATES, concepts)]
    add("task", tasks, 1100)
    add("snippet", [t.format(code=c) for t, c in product(SNIPPET_TEMPLATES, SNIPPETS)], 84)
    add("sql", [f"Given the tables {SQL_SCHEMA}, write a SQL query that {task}." for task in SQL_TASKS], 10)
    add("web", [f"Write a simple web page in HTML, CSS and JavaScript with {task}." for task in WEB_TASKS], 10)
    add("shell", [f"Write a bash script that {task}." for task in SHELL_TASKS], 8)
    add("code-lang", [f"Write a {lang} function that {desc}." for lang, (_, desc) in product(MORE_LANGUAGES, CODE_TASKS)], 700)
    add("reading", reading_prompts(rng, 2400), 2400)
    return out


def reading_prompts(rng: random.Random, n: int) -> list[str]:
    """n requests about made-up passages, spread evenly over the kinds of passage."""
    passages = {
        "people": lambda: synthetic.people_passage(rng, rng.randint(3, 6)),
        "companies": lambda: synthetic.company_passage(rng, rng.randint(3, 5)),
        "reviews": lambda: synthetic.reviews_passage(rng, rng.randint(3, 5)),
        "table": lambda: synthetic.sales_table(rng, rng.randint(3, 6)),
        "news": lambda: synthetic.news_passage(rng),
    }
    kinds = sorted(READING_TASKS)
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        out.append(rng.choice(READING_TASKS[kind]).format(text=passages[kind]()))
    return out


def training_prompts(gsm8k_path: str | Path, seed: int = 0, made_scale: float = 1.0) -> list[TrainPrompt]:
    """All training prompts in a fixed, shuffled order (so that a prefix is a fair mix)."""
    questions = read_gsm8k(gsm8k_path)
    rng = random.Random(seed)
    styles = [MATH_STYLE[rng.randrange(len(MATH_STYLE))] for _ in questions]
    prompts = [TrainPrompt(id=f"gsm8k-{i}", kind="math", text=s.format(q=q)) for i, (s, q) in enumerate(zip(styles, questions))]
    # Every other question from the back doubles as a passage to summarise or rewrite.
    passages = questions[::-2]
    prompts += made_prompts(passages, seed=seed, scale=made_scale)
    rng.shuffle(prompts)
    return prompts
